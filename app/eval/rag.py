"""RAG eval: retrieval metrics from app.rag.eval (recall@k, MRR, hybrid vs dense) plus end-to-end answer
metrics from real turns (in-process TurnRunner, or a running server's /v1/chat/completions):
citation precision, the "I don't know" rate on unanswerable tasks, answer accuracy against
`answer_contains`, and optionally an LLM-as-judge correctness score using the configured LLM.

Tasks (JSONL): {"question", "gold_document_ids": [...], "answer_contains": [...], "unanswerable": bool}.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from app.eval.data import read_jsonl

Answerer = Callable[[str], Awaitable[dict[str, Any]]]  # question -> {"answer", "citations", "blocked"}

JUDGE_PROMPT = (
    "You grade a bank support assistant's answer.\nQuestion: {question}\nFacts a correct answer must state: {facts}\n"
    "Answer: {answer}\nIs the answer correct and consistent with the facts? Reply with one word: CORRECT or INCORRECT."
)
JUDGE_GRAMMAR = 'root ::= "CORRECT" | "INCORRECT"'


def is_unanswerable(task: dict[str, Any]) -> bool:
    return bool(task.get("unanswerable")) or not task.get("gold_document_ids")


def is_idk(answer: str) -> bool:
    from app.rag.eval import _is_idk  # the RAG engineer's definition, shared so both evals agree

    return _is_idk(answer)


def server_answerer(url: str, api_key: str | None = None, timeout_s: float = 300) -> tuple[Answerer, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def answer(question: str) -> dict[str, Any]:
        response = await client.post("/v1/chat/completions",
                                     json={"messages": [{"role": "user", "content": question}]})
        body = response.json()
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {body}")
        extra = body.get("guardchat") or {}
        return {"answer": body["choices"][0]["message"]["content"] or "", "citations": extra.get("citations") or [],
                "blocked": bool(extra.get("blocked"))}

    return answer, client.aclose


def state_answerer(state: Any) -> Answerer:
    from app.pipeline.turn import TurnRequest, TurnRunner

    runner = TurnRunner(state)

    async def answer(question: str) -> dict[str, Any]:
        result = await runner.run(TurnRequest(messages=[{"role": "user", "content": question}]))
        return {"answer": result.answer, "citations": result.citations, "blocked": result.blocked}

    return answer


async def judge_answer(llm: Any, question: str, facts: list[str], answer: str) -> bool:
    from app.llm.base import GenerationOptions

    prompt = JUDGE_PROMPT.format(question=question, facts="; ".join(facts) or "(none given)", answer=answer)
    completion = await llm.complete([{"role": "user", "content": prompt}],
                                    GenerationOptions(max_tokens=4, temperature=0.0, grammar=JUDGE_GRAMMAR))
    return completion.text.strip().upper().startswith("CORRECT")


async def answer_metrics(tasks: list[dict[str, Any]], answerer: Answerer, judge_llm: Any = None) -> dict[str, Any]:
    cited = cited_gold = with_citation = contains_ok = contains_n = idk_unans = idk_ans = judged_ok = 0
    answerable = [t for t in tasks if not is_unanswerable(t)]
    unanswerable = [t for t in tasks if is_unanswerable(t)]
    examples: list[dict[str, Any]] = []
    for task in answerable:
        out = await answerer(task["question"])
        gold = set(task["gold_document_ids"])
        docs = [c.get("document_id") for c in out["citations"]]
        cited += len(docs)
        cited_gold += sum(1 for d in docs if d in gold)
        with_citation += int(bool(docs))
        idk_ans += int(is_idk(out["answer"]))
        expected = task.get("answer_contains") or []
        if expected:
            contains_n += 1
            ok = all(e.lower() in out["answer"].lower() for e in expected)
            contains_ok += int(ok)
        if judge_llm is not None:
            judged_ok += int(await judge_answer(judge_llm, task["question"], expected, out["answer"]))
        if len(examples) < 20:
            examples.append({"question": task["question"], "answer": out["answer"][:400], "cited": docs,
                             "gold": sorted(gold)})
    for task in unanswerable:
        out = await answerer(task["question"])
        idk_unans += int(is_idk(out["answer"]) or out["blocked"])

    def rate(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {
        "answerable": len(answerable),
        "unanswerable": len(unanswerable),
        "citation_precision": rate(cited_gold, cited),
        "answers_with_citations": rate(with_citation, len(answerable)),
        "answer_accuracy_contains": rate(contains_ok, contains_n),
        "idk_rate_unanswerable": rate(idk_unans, len(unanswerable)),
        "idk_rate_answerable": rate(idk_ans, len(answerable)),
        "judge_correctness": rate(judged_ok, len(answerable)) if judge_llm is not None else None,
        "examples": examples,
    }


def merged_tasks(paths: list[Path], limit: int | None) -> tuple[list[dict[str, Any]], Path]:
    tasks: list[dict[str, Any]] = []
    for path in paths:
        tasks += read_jsonl(Path(path), limit)
    tmp = Path(tempfile.mkstemp(prefix="guardchat-rag-tasks-", suffix=".jsonl")[1])
    tmp.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    return tasks, tmp


def render_rag_markdown(report: dict[str, Any], charts: dict[str, str]) -> str:
    def pct(v: Any) -> str:
        return "–" if v is None else f"{float(v) * 100:.1f}%"

    r = report.get("retrieval") or {}
    k = r.get("k")
    lines = ["# RAG eval", ""]
    if report.get("target"):
        lines += [f"Target: `{report['target']}`", ""]
    if r:
        lines += ["## Retrieval", "", f"Tasks: {r.get('answerable_tasks')} answerable, "
                  f"{r.get('unanswerable_tasks')} unanswerable; k = {k}, threshold = {r.get('threshold')}", "",
                  "| retriever | recall@1 | recall@k | gold coverage | MRR |", "|---|---|---|---|---|"]
        for name in ("hybrid", "dense", "bm25"):
            m = r.get(name)
            if m:
                lines.append(f"| {name} | {pct(m.get('recall@1'))} | {pct(m.get(f'recall@{k}'))} | "
                             f"{pct(m.get('gold_coverage'))} | {m.get('mrr', 0):.3f} |")
        lines += ["", f"Unanswerable tasks with nothing retrieved: {pct(r.get('unanswerable_retrieval_abstention'))}"]
    a = report.get("answers")
    if a:
        lines += ["", "## Answers (end to end)", "",
                  f"- citation precision (cited sources that are gold): {pct(a['citation_precision'])}",
                  f"- answers with at least one citation: {pct(a['answers_with_citations'])}",
                  f"- answer accuracy (all `answer_contains` present): {pct(a['answer_accuracy_contains'])}",
                  f"- unanswerable → \"I don't know\" rate: {pct(a['idk_rate_unanswerable'])}",
                  f"- answerable answered \"I don't know\": {pct(a['idk_rate_answerable'])}",
                  f"- LLM-as-judge correctness: {pct(a['judge_correctness'])}"]
    if charts:
        lines += ["", "## Charts", ""] + [f"![{n}]({p})" for n, p in charts.items()]
    return "\n".join(lines) + "\n"


def write_rag_report(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    charts: dict[str, str] = {}
    bars: dict[str, float] = {}
    r = report.get("retrieval") or {}
    k = r.get("k")
    for name in ("hybrid", "dense"):
        if r.get(name):
            bars[f"{name} recall@{k}"] = r[name][f"recall@{k}"]
            bars[f"{name} MRR"] = r[name]["mrr"]
    for key in ("citation_precision", "idk_rate_unanswerable", "answer_accuracy_contains", "judge_correctness"):
        value = (report.get("answers") or {}).get(key)
        if value is not None:
            bars[key] = value
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
