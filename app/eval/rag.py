"""`guardchat eval rag`: retrieval metrics from app.eval.retrieval (recall@k, MRR, hybrid vs dense vs BM25) plus the
end-to-end answers of real turns — every task a conversation in its own session, each turn through the real turn
pipeline (app/eval/rag_turns.py: in-process `TurnRunner`, or a running server's streamed
`/v1/chat/completions` with `X-Session-Id`), scored per kind by app/eval/rag_score.py, and optionally an
LLM-as-judge correctness score using the configured LLM.

Tasks (JSONL): the multi-turn format of app/eval/rag_turns.py, or the single-question format
`{"question", "gold_document_ids": [...], "answer_contains": [...], "unanswerable": bool}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from app.eval.rag_score import ChunkTexts, is_idk, legacy_answer_keys, summarise, verdict
from app.eval.rag_turns import Driver, InProcessDriver, ServerDriver, TurnOutcome, is_scored, load_tasks, run_tasks
from app.rag.base import Retriever

__all__ = ["is_idk", "is_unanswerable", "run_rag_eval"]

JUDGE_PROMPT = (
    "You grade a bank support assistant's answer.\nQuestion: {question}\nFacts a correct answer must state: {facts}\n"
    "Answer: {answer}\nIs the answer correct and consistent with the facts? Reply with one word: CORRECT or INCORRECT."
)
JUDGE_GRAMMAR = 'root ::= "CORRECT" | "INCORRECT"'


def is_unanswerable(task: dict[str, Any]) -> bool:
    """For a single-question row: marked unanswerable, or no gold document."""
    return bool(task.get("unanswerable")) or not task.get("gold_document_ids")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def judge_answer(llm: Any, question: str, facts: list[Any], answer: str) -> bool:
    from app.llm.base import GenerationOptions

    shown = "; ".join(f if isinstance(f, str) else " or ".join(f) for f in facts) or "(none given)"
    prompt = JUDGE_PROMPT.format(question=question, facts=shown, answer=answer)
    completion = await llm.complete([{"role": "user", "content": prompt}],
                                    GenerationOptions(max_tokens=4, temperature=0.0, grammar=JUDGE_GRAMMAR))
    return completion.text.strip().upper().startswith("CORRECT")


def retrieval_tasks(tasks: list[dict[str, Any]]) -> Path:
    """The one-turn tasks in the single-question format app.eval.retrieval reads (a follow-up's retrieval is measured by
    bench/followup_retrieval.py), in a temp file the caller deletes."""
    rows = []
    for task in tasks:
        if len(task["turns"]) == 1 and is_scored(task["turns"][0]):
            turn = task["turns"][0]
            rows.append({"question": turn["user"], "gold_document_ids": turn.get("gold_document_ids") or [],
                         "unanswerable": bool(turn.get("unanswerable"))})
    path = Path(tempfile.mkstemp(prefix="guardchat-rag-tasks-", suffix=".jsonl")[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chunk_lookup(retriever: Retriever | None) -> ChunkTexts:
    """Chunk ids -> "title\\ncontent" from the retriever's live index (ids it does not hold are skipped)."""

    def texts(ids: list[str]) -> list[str]:
        if retriever is None:
            return []
        snapshot = retriever.snapshot
        rows = [snapshot.row_of.get(i) for i in ids]
        return [f"{snapshot.chunks[r].get('title', '')}\n{snapshot.chunks[r].get('content', '')}"
                for r in rows if r is not None]

    return texts


@contextlib.asynccontextmanager
async def _driver(settings: Any, server: str | None, api_key: str | None) -> AsyncIterator[tuple[Driver, Any, str]]:
    """(driver, retriever for the chunk texts, the "I don't know" text) for a server or an in-process app."""
    from app.rag.chain import DEFAULT_IDK

    if server:
        from app.rag.retrieve import HybridRetriever

        driver = ServerDriver(server, api_key)
        try:
            # The local index (the one retrieval is measured on) and the local rails' text: the server's own.
            yield driver, HybridRetriever(settings), _rails_idk(settings) or DEFAULT_IDK
        finally:
            await driver.aclose()
        return
    from app.main import build_state, close_state

    _say("eval rag: starting the app in-process (LLM, guard, retriever)...")
    state = await build_state(settings)
    try:
        await _warm_pages(state)
        yield InProcessDriver(state), state.retriever, state.rails.current.guard.texts.idk
    finally:
        await close_state(state)


async def _warm_pages(state: Any) -> None:
    """With answer pages, the eval asks once every page is in the LLM's prompt cache, as a server that has been up
    a while would have them: the answers then never depend on how far the warm-up got (app/llm/page_warmer.py)."""
    from app.pipeline.answer_pages import plan_warmup

    warmer = state.page_warmer
    if warmer is None:
        return
    if not state.settings.rag_warm_pages:  # only the pages turns ask for, read between them
        warmer.start()
        return
    pages = plan_warmup(state, warmer)
    _say(f"eval rag: reading {pages} answer pages into the LLM's prompt cache first...")
    warmer.start()
    await warmer.wait_until_warm(timeout_s=3 * 3600)
    await warmer.stop()
    _say(f"eval rag: answer pages {warmer.progress()}")


async def turn_answers(tasks: list[dict[str, Any]], settings: Any, *, server: str | None = None,
                       api_key: str | None = None, judge: bool = False, log_path: Path | None = None) -> dict[str, Any]:
    """Runs every task's turns and scores them: the report's `answers` section (each task's outcomes also go to
    `log_path` as it finishes)."""
    async with _driver(settings, server, api_key) as (driver, retriever, idk_text):
        _say(f"eval rag: {len(tasks)} tasks, {sum(len(t['turns']) for t in tasks)} turns "
             f"({'server ' + server if server else 'in-process'})")
        results = await run_tasks(tasks, driver, verdict=verdict, on_progress=_say, log_path=log_path,
                                  log_extra={"idk_text": idk_text})
        report = {**legacy_answer_keys(tasks, results),
                  "turns": summarise(tasks, results, chunk_texts=chunk_lookup(retriever), idk_text=idk_text)}
    report["judge_correctness"] = await _judge(tasks, results, settings) if judge else None
    return report


async def _judge(tasks: list[dict[str, Any]], results: list[list[TurnOutcome]], settings: Any) -> float | None:
    from app.llm.factory import build_chat_backend

    llm, embedded = build_chat_backend(settings)
    ok = n = 0
    try:
        for task, outcomes in zip(tasks, results, strict=True):
            for turn, out in zip(task["turns"], outcomes, strict=False):
                if is_scored(turn) and not turn.get("unanswerable"):
                    n += 1
                    ok += int(await judge_answer(llm, out.user, turn["answer_contains"], out.answer))
    finally:
        await llm.aclose()
        if embedded is not None:
            embedded.close()
    return round(ok / n, 4) if n else None


def run_rag_eval(
    data: list[Path],
    settings: Any,
    *,
    server: str | None = None,
    out_dir: Path = Path("eval-report"),
    limit: int | None = None,
    api_key: str | None = None,
    k: int = 5,
    answers: bool = True,
    judge: bool = False,
    unanswerable: Path | None = None,
    retrieval: bool = True,
    kinds: list[str] | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Retrieval metrics (always in-process, on the local index — built from KNOWLEDGE_DIR if missing) and, with
    `answers`, every task's turns end to end. `limit` takes the first N tasks of each file (after the `kinds` and
    `split` filters)."""
    from app.eval.data import DEFAULT_RAG_TASKS
    from app.eval.report import write_rag_report

    paths = list(data) or [DEFAULT_RAG_TASKS]
    tasks = load_tasks(paths, limit=limit, kinds=kinds, split=split)
    if not tasks:
        raise ValueError(f"no tasks in {', '.join(map(str, paths))} (kinds={kinds}, split={split})")
    report: dict[str, Any] = {"kind": "rag", "target": server or "in-process", "data": [str(p) for p in paths],
                              "split": split, "kinds": kinds}
    _ensure_index(settings)
    if retrieval:
        report["retrieval"] = _retrieval(tasks, settings, k, unanswerable)
    if answers or judge:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "rag_turns.jsonl"
        log_path.unlink(missing_ok=True)
        _say(f"eval rag: each task's turns are written to {log_path} as it finishes")
        report["answers"] = asyncio.run(turn_answers(tasks, settings, server=server, api_key=api_key, judge=judge,
                                                     log_path=log_path))
    return write_rag_report(report, out_dir)


def rescore(log_path: Path, settings: Any, out_dir: Path) -> dict[str, Any]:
    """Scores a run's `rag_turns.jsonl` again (after a scoring change, or of a run stopped early) without running a
    turn: chunk texts come from the local index, which must be the one the run retrieved from."""
    from app.eval.report import write_rag_report
    from app.rag.chain import DEFAULT_IDK
    from app.rag.retrieve import HybridRetriever

    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tasks = [r["task"] for r in rows]
    results = [[TurnOutcome(**o) for o in r["outcomes"]] for r in rows]
    idk_text = next((r["idk_text"] for r in rows if r.get("idk_text")), None) or _rails_idk(settings) or DEFAULT_IDK
    answers = {**legacy_answer_keys(tasks, results), "judge_correctness": None,
               "turns": summarise(tasks, results, chunk_texts=chunk_lookup(HybridRetriever(settings)),
                                  idk_text=idk_text)}
    return write_rag_report({"kind": "rag", "target": f"rescored {log_path}", "answers": answers}, out_dir)


def _rails_idk(settings: Any) -> str | None:
    """The configured "I don't know" text (`define bot inform idk` in the rails dir), read without loading NeMo."""
    import re

    from app.guard.loader import read_rails_files

    for text in read_rails_files(Path(settings.rails_dir)).values():
        found = re.search(r'define bot inform idk\s*\n\s*"([^"]+)"', text)
        if found:
            return found.group(1)
    return None


def _ensure_index(settings: Any) -> None:
    """Without an index every turn would answer "I don't know" at once: build it from KNOWLEDGE_DIR first."""
    from app.rag.embedder import get_embedder
    from app.rag.ingest import index_exists, ingest_directory

    if settings.rag_enabled and not index_exists(settings):
        _say(f"eval rag: no index in {settings.index_dir}: ingesting {settings.knowledge_dir} first")
        ingest_directory(None, settings, embedder=get_embedder(), progress=True)


def _retrieval(tasks: list[dict[str, Any]], settings: Any, k: int, unanswerable: Path | None) -> dict[str, Any]:
    from app.eval.retrieval import eval_rag
    from app.rag.embedder import get_embedder

    _say("eval rag: retrieval metrics" + (" (+ the unanswerable contexts, ingested apart)" if unanswerable else ""))
    tasks_file = retrieval_tasks(tasks)
    if not tasks_file.read_text(encoding="utf-8").strip():
        tasks_file.unlink(missing_ok=True)
        return {}  # only multi-turn tasks: nothing for the one-question retrieval metrics
    try:
        return eval_rag(tasks_file, settings, embedder=get_embedder(), k=k, unanswerable_path=unanswerable,
                        ingest_first=False)
    finally:
        tasks_file.unlink(missing_ok=True)
