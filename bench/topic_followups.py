"""The topic rail on follow-ups: the shipped rails on two/three-turn conversations, message alone vs in context.

    .venv/bin/python -m bench.topic_followups [--data tests/data/topic_followups.jsonl] [--engines compiled,nemo]
                                             [--out report.json]

Each conversation (tests/data/topic_followups.jsonl) is earlier turns, the next user message and whether the
assistant should answer it (`allow`: a follow-up that stays on a bank subject) or refuse it (`refuse`: a topic
switch, an off-topic or advice follow-up, an attack or a harmful request). Every message goes through the real input
rails of the shipped config (rails/, the guard model, the example matchers; the server's query embedder) twice:
alone (what the rails did before follow-ups were judged in context, and what they still do without history) and
with its conversation. Counted: refused-allow (an on-domain follow-up refused) and allowed-refuse (a switch, advice,
attack or harmful message let through), per engine; the engines must agree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any, cast

from app.guard.detector import load_classifier
from app.guard.rails import RailsGuard, build_guard
from app.llm.base import ChatBackend
from app.main import query_embedder
from app.rag.embedder import get_embedder
from app.settings import PROJECT_ROOT, Settings

DATA = PROJECT_ROOT / "tests" / "data" / "topic_followups.jsonl"


class _NoJudge:
    """The chat LLM: the shipped thresholds never ask it (the guard model decides alone)."""

    model_name = "none"

    async def complete_prompt(self, prompt: str, options: Any = None) -> Any:
        raise RuntimeError("the shipped rails asked the LLM judge")


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    for user, answer in row["history"]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": row["message"]}]


async def judge(guard: RailsGuard, embedder: Any, row: dict[str, Any]) -> dict[str, Any]:
    """The verdicts on the message alone and in its conversation, with the topic rail's detail."""
    vec = (await asyncio.to_thread(embedder.embed, [row["message"]]))[0]
    out: dict[str, Any] = {}
    for name, messages in (("alone", conversation(row)[-1:]), ("context", conversation(row))):
        decision = await guard.check_input(messages, vec)
        out[name] = "allow" if decision.allowed else "refuse"
        out[f"{name}_by"] = decision.blocked_by
        out[f"{name}_topic"] = next((r.detail for r in decision.rails if r.name == "topic"), None)
    return out


def tally(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]], key: str) -> tuple[int, int]:
    """(refused-allow, allowed-refuse) for one column of verdicts."""
    refused_allow = sum(r["expect"] == "allow" and v[key] == "refuse" for r, v in zip(rows, verdicts, strict=True))
    allowed_refuse = sum(r["expect"] == "refuse" and v[key] == "allow" for r, v in zip(rows, verdicts, strict=True))
    return refused_allow, allowed_refuse


async def run_engine(engine: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    settings = Settings(rails_engine=cast(Any, engine), guard_backend="embedded")
    embedder = get_embedder()
    detector = load_classifier(settings.guard_classifier, threads=settings.guard_threads)
    llm = cast(ChatBackend, _NoJudge())
    guard = build_guard(settings.rails_dir, settings, llm=llm, embedder=embedder, detector=detector)
    turn_embedder = query_embedder(detector, embedder) or embedder  # the server's: the guard model's shared pass
    try:
        return [await judge(guard, turn_embedder, row) for row in rows]
    finally:
        await guard.aclose()


def print_tallies(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """refused-allow / allowed-refuse before and after, per set of the data and in all."""
    out: dict[str, Any] = {}
    sets = [*dict.fromkeys(r.get("set", "all") for r in rows), "all"]
    print(f"  {'set':12} {'':24} refused-allow  allowed-refuse")
    for name in sets if len(sets) > 2 else ["all"]:
        pairs = [(r, v) for r, v in zip(rows, verdicts, strict=True) if name in ("all", r.get("set", "all"))]
        subset, subset_verdicts = [r for r, _ in pairs], [v for _, v in pairs]
        n_allow = sum(r["expect"] == "allow" for r in subset)
        for key, label in (("alone", "before (message alone)"), ("context", "after (in context)")):
            ra, ar = tally(subset, subset_verdicts, key)
            print(f"  {name:12} {label:24} {ra:4d}/{n_allow:<3d}       {ar:4d}/{len(subset) - n_allow}")
            out.setdefault(name, {})[key] = {"refused_allow": ra, "allowed_refuse": ar}
    return out


def report(rows: list[dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    n_allow = sum(r["expect"] == "allow" for r in rows)
    print(f"{len(rows)} conversations: {n_allow} allow, {len(rows) - n_allow} refuse")
    summary: dict[str, Any] = {"conversations": len(rows), "allow": n_allow, "engines": {}}
    for engine, verdicts in results.items():
        print(f"\nengine {engine}:")
        summary["engines"][engine] = print_tallies(rows, verdicts)
        changed = [(r, v) for r, v in zip(rows, verdicts, strict=True) if v["alone"] != v["context"]]
        print(f"  changed by the context: {len(changed)}")
        for row, v in changed:
            mark = "ok " if v["context"] == row["expect"] else "BAD"
            print(
                f"    {mark} {row['id']} {row.get('set', ''):11} {row['kind']:10} {v['alone']} -> {v['context']}: "
                f"{row['message']}"
            )
        wrong = [(r, v) for r, v in zip(rows, verdicts, strict=True) if v["context"] != r["expect"]]
        print(f"  still wrong in context: {len(wrong)}")
        for row, v in wrong:
            print(
                f"    {row['id']} {row.get('set', ''):11} {row['kind']:10} expect {row['expect']}, {v['context']} "
                f"({v['context_by']}, alone {v['alone']}): "
                f"{row['message']}\n        topic: {v['context_topic']}"
            )
        by_kind = Counter(r["kind"] for r, v in zip(rows, verdicts, strict=True) if v["context"] == r["expect"])
        summary["engines"][engine]["right_by_kind"] = {
            kind: f"{by_kind[kind]}/{total}" for kind, total in sorted(Counter(r["kind"] for r in rows).items())
        }
    engines = list(results)
    if len(engines) > 1:
        base = results[engines[0]]
        differ = [
            r["id"]
            for i, r in enumerate(rows)
            if any(
                (results[e][i]["alone"], results[e][i]["context"]) != (base[i]["alone"], base[i]["context"])
                for e in engines[1:]
            )
        ]
        print(f"\nengines {' / '.join(engines)} differ on: {differ or 'none'}")
        summary["engines_differ"] = differ
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--engines", default="compiled,nemo", help="comma-separated: compiled, nemo, auto")
    parser.add_argument("--out", type=Path, help="write the summary and every verdict as JSON")
    args = parser.parse_args()
    rows = load(args.data)
    results = {engine: asyncio.run(run_engine(engine, rows)) for engine in args.engines.split(",")}
    summary = report(rows, results)
    if args.out:
        summary["verdicts"] = {
            e: [{"id": r["id"], **v} for r, v in zip(rows, vs, strict=True)] for e, vs in results.items()
        }
        args.out.write_text(json.dumps(summary, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
