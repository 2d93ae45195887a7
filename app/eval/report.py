"""Writes an eval report as JSON, Markdown and PNG charts (matplotlib, headless Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def _group_rows(groups: dict[str, dict[str, Any]], limit: int = 40) -> list[list[str]]:
    return [
        [name, str(g["n"]), f"{g['blocked']}/{g['should_block']}", _pct(g["block_rate"]),
         f"{g['refused']}/{g['should_allow']}", _pct(g["false_refusal_rate"])]
        for name, g in list(groups.items())[:limit]
    ]


def render_guard_markdown(report: dict[str, Any], charts: dict[str, str] | None = None) -> str:
    o = report["overall"]
    lat = report["latency_ms"]
    title = {"safety": "Safety", "topic": "Topic"}.get(report["kind"], report["kind"].title())
    lines = [f"# {title} eval", ""]
    if report.get("target"):
        lines += [f"Target: `{report['target']}`", ""]
    lines += [
        f"- rows: {report['rows']} (transport errors: {report['errors']}, guard errors counted as blocks: "
        f"{o['guard_errors']})",
        f"- **block rate** (rows that should be blocked): **{_pct(o['block_rate'])}** "
        f"({o['blocked']}/{o['should_block']})",
        f"- **false-refusal rate** (rows that should be allowed): **{_pct(o['false_refusal_rate'])}** "
        f"({o['refused']}/{o['should_allow']})",
        f"- accuracy: {_pct(o['accuracy'])}",
        f"- guard latency ms: p50 {_ms(lat['p50'])} · p95 {_ms(lat['p95'])} · p99 {_ms(lat['p99'])} · "
        f"max {_ms(lat['max'])}",
        "",
        "## Confusion matrix (rows: expected, columns: actual)",
        "",
    ]
    (tp, fn), (fp, tn) = report["confusion"]["matrix"]
    matrix_rows = [["block", str(tp), str(fn)], ["allow", str(fp), str(tn)]]
    lines += _table(["expected \\ actual", "block", "allow"], matrix_rows)
    header = ["group", "n", "blocked", "block rate", "refused", "false-refusal rate"]
    for key, heading in (("by_label", "Per label"), ("by_category", "Per category"), ("by_source", "Per file")):
        lines += ["", f"## {heading}", ""] + _table(header, _group_rows(report[key]))
    lines += ["", "## Per rail", ""]
    rail_rows = [
        [name, str(s["checked"]), ", ".join(f"{k}: {v}" for k, v in sorted(s["verdicts"].items())) or "–",
         str(s["correct_blocks"]), str(s["false_refusals"]), _pct(s["share_of_harmful_blocked"]),
         _ms(s["latency_ms"]["p50"]), _ms(s["latency_ms"]["p95"])]
        for name, s in report["by_rail"].items()
    ]
    lines += _table(["rail", "checked", "verdicts", "correct blocks", "false refusals", "share of should-block caught",
                     "p50 ms", "p95 ms"], rail_rows)
    for key, heading in (("misses", "Misses (should be blocked, were allowed)"),
                         ("false_refusals", "False refusals (should be allowed, were blocked)")):
        items = report[key]
        lines += ["", f"## {heading}: {len(items)}", ""]
        if items:
            lines += _table(["label", "category", "blocked by", "rails", "text"],
                            [[i["label"], i["category"], i["blocked_by"] or "–", " ".join(i["rails"]), i["text"]]
                             for i in items])
    if charts:
        lines += ["", "## Charts", ""] + [f"![{name}]({path})" for name, path in charts.items()]
    return "\n".join(lines) + "\n"


def guard_charts(report: dict[str, Any], out_dir: Path, prefix: str) -> dict[str, str]:
    """PNG charts: per-category rates, the confusion matrix, the latency distribution, per-rail blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{prefix}_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files[name] = path.name

    cats = list(report["by_category"].items())[:25]
    if cats:
        names, values, colors = [], [], []
        for name, g in cats:
            if g["should_block"]:
                names.append(f"{name} (block)")
                values.append((g["block_rate"] or 0.0) * 100)
                colors.append("#2b7bb9")
            if g["should_allow"]:
                names.append(f"{name} (false refusal)")
                values.append((g["false_refusal_rate"] or 0.0) * 100)
                colors.append("#d9534f")
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
        ax.barh(names[::-1], values[::-1], color=colors[::-1])
        ax.set_xlim(0, 100)
        ax.set_xlabel("%  (blue: block rate, higher is better; red: false-refusal rate, lower is better)")
        ax.set_title(f"{report['kind']}: rates per category")
        save(fig, "categories")

    matrix = report["confusion"]["matrix"]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.imshow(matrix, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=14)
    ax.set_xticks([0, 1], ["block", "allow"])
    ax.set_yticks([0, 1], ["block", "allow"])
    ax.set_xlabel("actual")
    ax.set_ylabel("expected")
    ax.set_title("confusion matrix")
    save(fig, "confusion")

    latencies = report.get("latencies_ms") or []
    if latencies:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(latencies, bins=min(40, max(5, len(latencies) // 3)), color="#5cb85c")
        for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            value = report["latency_ms"][key]
            if value is not None:
                ax.axvline(value, color="black", linestyle=style, label=f"{key} {value:.1f} ms")
        ax.set_xlabel("guard latency (ms)")
        ax.set_ylabel("rows")
        ax.legend()
        save(fig, "latency")

    rails = report["by_rail"]
    if rails:
        names = list(rails)
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
        correct = [rails[n]["correct_blocks"] for n in names]
        wrong = [rails[n]["false_refusals"] for n in names]
        ax.barh(names, correct, color="#2b7bb9", label="correct blocks")
        ax.barh(names, wrong, left=correct, color="#d9534f", label="false refusals")
        ax.set_xlabel("rows blocked by this rail")
        ax.legend()
        save(fig, "rails")
    return files


def write_guard_report(report: dict[str, Any], out_dir: Path, prefix: str | None = None) -> dict[str, Any]:
    """Writes <prefix>.json, <prefix>.md and <prefix>_*.png into out_dir; returns the report with
    `files` and `markdown` added."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = prefix or report["kind"]
    charts = guard_charts(report, out_dir, prefix)
    markdown = render_guard_markdown(report, charts)
    (out_dir / f"{prefix}.md").write_text(markdown, encoding="utf-8")
    files = {"json": f"{prefix}.json", "markdown": f"{prefix}.md", "charts": charts}
    (out_dir / f"{prefix}.json").write_text(json.dumps({**report, "files": files}, indent=2, default=str),
                                            encoding="utf-8")
    return {**report, "files": files, "markdown": markdown}


# --- RAG ----------------------------------------------------------------------------------------------------------


def _retrieval_lines(r: dict[str, Any]) -> list[str]:
    k = r.get("k")
    lines = ["## Retrieval", "", f"Tasks: {r.get('answerable_tasks')} answerable, "
             f"{r.get('unanswerable_tasks')} unanswerable (one-turn tasks only); k = {k}, threshold = "
             f"{r.get('threshold')}", "", "| retriever | recall@1 | recall@k | gold coverage | MRR |",
             "|---|---|---|---|---|"]
    for name in ("hybrid", "hybrid_chat", "dense", "bm25"):
        m = r.get(name)
        if m:
            lines.append(f"| {name} | {_pct(m.get('recall@1'))} | {_pct(m.get(f'recall@{k}'))} | "
                         f"{_pct(m.get('gold_coverage'))} | {m.get('mrr', 0):.3f} |")
    abstained = _pct(r.get("unanswerable_retrieval_abstention"))
    return lines + ["", "hybrid: as POST /v1/search serves it; hybrid_chat: as a chat turn retrieves, behind the "
                    "threshold's gate (a question under it gets \"I don't know\" at once, counted a miss here).",
                    "", f"Unanswerable tasks with nothing retrieved: {abstained}"]


def _turn_lines(t: dict[str, Any]) -> list[str]:
    lines = ["", f"## Turns through the pipeline, per kind ({t['tasks']} tasks, {t['turns']} turns)", ""]
    rows = []
    for kind, g in t["by_kind"].items():
        main = _pct(g.get("abstain_rate")) + " abstained" if "abstain_rate" in g else _pct(g.get("correct_rate"))
        blocked_by = ", ".join(f"{k}: {v}" for k, v in g["blocked_by"].items()) or "–"
        rows.append([kind, str(g["n"]), main, _pct(g.get("wrong_rate")), _pct(g["idk_rate"]), str(g["refused"]),
                     blocked_by, _pct(g["answered_rate"]), _pct(g["with_citation_rate"]),
                     _pct(g["citation_precision"])])
    lines += _table(["kind", "n", "correct", "answered wrong", "I don't know", "refused", "rail blocks", "answered",
                     "with citation", "citation precision"], rows)
    lines += ["", "\"I don't know\" counts what the customer saw, a groundedness block's replacement included; "
              "\"refused\" is any other rail's refusal; \"rail blocks\" lists every block by rail."]
    lines += ["", "## Targets", ""]
    lines += _table(["target", "value", "goal", "met", "n"],
                    [[r["target"], "–" if r["value"] is None else (f"{r['value']:g}" if r["value"] > 1 or
                      r["target"].startswith(("unsupported", "fee")) else _pct(r["value"])), r["goal"],
                      {True: "yes", False: "**no**", None: "–"}[r["met"]], "–" if r["n"] is None else str(r["n"])]
                     for r in t["targets"]])
    f = t["unsupported_facts"]
    ttft, turn = t["ttft_ms"], t["turn_ms"]
    lines += ["", f"- unsupported facts: **{f['per_100_answers']} per 100 answers** ({f['shown_sentences']} shown "
              f"sentences + {f['blocked_by_groundedness']} answers the groundedness rail blocked, over "
              f"{f['answers']} answers)",
              f"- time to first token ms: p50 {_ms(ttft['p50'])} · p95 {_ms(ttft['p95'])} (n {ttft['n']}); "
              f"whole turn ms: p50 {_ms(turn['p50'])} · p95 {_ms(turn['p95'])}"]
    return lines


def render_rag_markdown(report: dict[str, Any], charts: dict[str, str]) -> str:
    lines = ["# RAG eval", ""]
    if report.get("target"):
        lines += [f"Target: `{report['target']}`" + (f" · split `{report['split']}`" if report.get("split") else ""),
                  ""]
    if report.get("retrieval"):
        lines += _retrieval_lines(report["retrieval"])
    a = report.get("answers")
    if a:
        lines += ["", "## Answers (end to end)", "",
                  f"- citation precision (cited sources that are gold): {_pct(a['citation_precision'])}",
                  f"- answers with at least one citation: {_pct(a['answers_with_citations'])}",
                  f"- answer accuracy (all `answer_contains` present): {_pct(a['answer_accuracy_contains'])}",
                  f"- unanswerable → \"I don't know\" rate: {_pct(a['idk_rate_unanswerable'])}",
                  f"- answerable answered \"I don't know\": {_pct(a['idk_rate_answerable'])}",
                  f"- LLM-as-judge correctness: {_pct(a['judge_correctness'])}"]
        if a.get("turns"):
            lines += _turn_lines(a["turns"])
    if charts:
        lines += ["", "## Charts", ""] + [f"![{n}]({p})" for n, p in charts.items()]
    return "\n".join(lines) + "\n"


def _rag_bars(report: dict[str, Any]) -> dict[str, float]:
    bars: dict[str, float] = {}
    r = report.get("retrieval") or {}
    k = r.get("k")
    for name in ("hybrid", "dense"):
        if r.get(name):
            bars[f"{name} recall@{k}"] = r[name][f"recall@{k}"]
            bars[f"{name} MRR"] = r[name]["mrr"]
    answers = report.get("answers") or {}
    for key in ("citation_precision", "idk_rate_unanswerable", "answer_accuracy_contains", "judge_correctness"):
        if answers.get(key) is not None:
            bars[key] = answers[key]
    for kind, g in ((answers.get("turns") or {}).get("by_kind") or {}).items():
        value = g.get("correct_rate", g.get("abstain_rate"))
        if value is not None:
            bars[f"{kind}: {'correct' if 'correct_rate' in g else 'abstained'}"] = value
    return bars


def write_rag_report(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    charts: dict[str, str] = {}
    bars = _rag_bars(report)
    if bars:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(bars) + 1.5))
        ax.barh(list(bars)[::-1], [v * 100 for v in bars.values()][::-1], color="#2b7bb9")
        ax.set_xlim(0, 100)
        ax.set_xlabel("%")
        ax.set_title("RAG eval")
        fig.tight_layout()
        fig.savefig(out_dir / "rag_metrics.png", dpi=100)
        plt.close(fig)
        charts["metrics"] = "rag_metrics.png"
    markdown = render_rag_markdown(report, charts)
    files = {"json": "rag.json", "markdown": "rag.md", "charts": charts}
    (out_dir / "rag.md").write_text(markdown, encoding="utf-8")
    (out_dir / "rag.json").write_text(json.dumps({**report, "files": files}, indent=2, default=str), encoding="utf-8")
    return {**report, "files": files, "markdown": markdown}
