"""Entry points of `guardchat eval safety|topic|rag|all`. Synchronous (each runs its own event loop).

In-process runs build the same components the server builds (LLM backend — starting the embedded
llama.cpp server when configured —, MiniLM embedder, detector, rails guard), once per run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from app.eval.data import SAFETY_SMOKE_DATA, TOPIC_DATA, load_rows
from app.eval.guard_eval import check_in_process, check_via_server, summarize
from app.eval.report import write_guard_report

# The RAG engineer's task set (gold document ids for the shipped knowledge/).


@contextlib.asynccontextmanager
async def in_process_guard(settings: Any) -> AsyncIterator[tuple[Any, Any]]:
    """(guard, embedder) for the configured rails, closed afterwards."""
    from app.guard.detector import load_classifier
    from app.guard.rails import build_guard
    from app.llm.factory import build_chat_backend
    from app.rag.embedder import get_embedder

    llm, embedded_server = build_chat_backend(settings)
    try:
        embedder = get_embedder()
        detector = load_classifier(settings.guard_classifier, threads=settings.guard_threads)
        guard = build_guard(settings.rails_dir, settings, llm=llm, embedder=embedder, detector=detector)
        try:
            yield guard, embedder
        finally:
            await guard.aclose()
    finally:
        await llm.aclose()
        if embedded_server is not None:
            embedded_server.close()


def run_guard_eval(
    kind: str,
    data: list[Path],
    settings: Any,
    *,
    server: str | None = None,
    out_dir: Path = Path("eval-report"),
    limit: int | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """kind = "safety" | "topic". With no data files: the shipped topic set (topic) or smoke set (safety)."""
    paths = list(data) or [TOPIC_DATA if kind == "topic" else SAFETY_SMOKE_DATA]
    rows = load_rows(paths, limit)
    if not rows:
        raise ValueError(f"no labelled rows in {', '.join(map(str, paths))}")

    async def run() -> list[Any]:
        if server:
            return await check_via_server(server, rows, api_key=api_key)
        async with in_process_guard(settings) as (guard, embedder):
            return await check_in_process(guard, embedder, rows)

    report = summarize(asyncio.run(run()), kind)
    report["target"] = server or "in-process"
    report["data"] = [str(p) for p in paths]
    return write_guard_report(report, out_dir, kind)


def run_rag_eval(data: list[Path], settings: Any, **options: Any) -> dict[str, Any]:
    """Retrieval metrics and, with `answers`, every task's turns end to end through the real turn pipeline
    (app/eval/rag.py, which documents the options)."""
    from app.eval.rag import run_rag_eval as run

    return run(data, settings, **options)


def run_all(
    data: list[Path],
    settings: Any,
    *,
    server: str | None = None,
    out_dir: Path = Path("eval-report"),
    limit: int | None = None,
    api_key: str | None = None,
    rag_data: list[Path] | None = None,
) -> dict[str, Any]:
    """safety (on `data`, or the smoke set), topic (the shipped topic set) and rag (`rag_data` or the shipped
    tasks); an index.md links the three reports."""
    common: dict[str, Any] = {"server": server, "out_dir": out_dir, "limit": limit, "api_key": api_key}
    reports = {
        "safety": run_guard_eval("safety", data, settings, **common),
        "topic": run_guard_eval("topic", [], settings, **common),
        "rag": run_rag_eval(rag_data or [], settings, **common),
    }
    lines = ["# guardchat eval", ""]
    for name, rep in reports.items():
        lines.append(f"- [{name}]({rep['files']['markdown']})")
    s, t = reports["safety"]["overall"], reports["topic"]["overall"]
    lines += ["", f"- safety: block rate {s['block_rate']}, false-refusal rate {s['false_refusal_rate']}",
              f"- topic: block rate {t['block_rate']}, false-refusal rate {t['false_refusal_rate']}"]
    markdown = "\n".join(lines) + "\n"
    (out_dir / "index.md").write_text(markdown, encoding="utf-8")
    return {"reports": {k: {kk: vv for kk, vv in v.items() if kk != "markdown"} for k, v in reports.items()},
            "markdown": markdown}
