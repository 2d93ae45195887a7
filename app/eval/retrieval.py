"""Retrieval and answer evaluation (`guardchat eval rag`).

Tasks file (JSONL): {"question", "gold_document_ids": [...], "answer_contains": [...], "unanswerable": bool}.

Reports, for the answerable tasks: hit rate@k ("recall@k": a gold document among the top k chunks),
recall@1, gold coverage, MRR, for the hybrid retriever as POST /v1/search serves it (`rag_search_threshold`: no gate
by default), as a chat turn retrieves (`hybrid_chat`: the `rag_score_threshold` gate, whose abstentions count as
misses), plain dense search (the comparison that shows the hybrid gain) and plain BM25; for unanswerable tasks and
off-domain questions, the
retrieval-level abstention rate (nothing above the threshold); a threshold sweep to tune
`rag_score_threshold`; and with an `llm`, generation metrics: citation validity/precision, answer
accuracy and the "I don't know" rate. Call it from synchronous code (the CLI): it runs its own event loop,
so pass `llm` as a zero-argument factory (e.g. `lambda: OpenAICompatClient(...)`) to have the client
created and closed inside that loop; a ready client works too if it is not bound to another loop.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.llm.base import ChatBackend, GenerationOptions
from app.rag.base import Chunk, Embedder
from app.rag.chain import DEFAULT_IDK, build_messages, cited_numbers
from app.rag.ingest import ingest, ingest_directory
from app.rag.retrieve import HybridRetriever

UNANSWERABLE_DEV = Path("/work/shared/eval/unanswerable_dev.jsonl")
SWEEP = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
EVAL_SYSTEM_PROMPT = "You are Larkspur Bank's support assistant."


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def rank_metrics(ranked: list[list[Chunk]], golds: list[set[str]], k: int) -> dict[str, float]:
    hits, firsts, coverage, reciprocal = [], [], [], []
    for chunks, gold in zip(ranked, golds, strict=True):
        docs = [c.document_id for c in chunks[:k]]
        hits.append(float(any(d in gold for d in docs)))
        firsts.append(float(bool(docs) and docs[0] in gold))
        coverage.append(len(gold & set(docs)) / len(gold))
        first = next((i for i, d in enumerate(docs) if d in gold), None)
        reciprocal.append(0.0 if first is None else 1.0 / (first + 1))
    n = max(len(ranked), 1)
    return {
        "recall@1": sum(firsts) / n,
        f"recall@{k}": sum(hits) / n,
        "gold_coverage": sum(coverage) / n,
        "mrr": sum(reciprocal) / n,
    }


def eval_rag(
    tasks_path: Path,
    settings: Any,
    *,
    embedder: Embedder,
    k: int = 5,
    llm: ChatBackend | Callable[[], ChatBackend] | None = None,
    unanswerable_path: Path | None = UNANSWERABLE_DEV,
    unanswerable_limit: int = 60,
    ingest_first: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    if ingest_first:
        ingest_directory(None, settings, embedder=embedder, progress=progress)
    retriever = HybridRetriever(settings)
    tasks = _read_jsonl(Path(tasks_path))
    answerable = [t for t in tasks if t.get("gold_document_ids") and not t.get("unanswerable")]
    unanswerable = [t for t in tasks if t.get("unanswerable") or not t.get("gold_document_ids")]
    questions = [t["question"] for t in answerable + unanswerable]
    vectors = embedder.embed(questions)
    answer_vecs, unanswer_vecs = vectors[: len(answerable)], vectors[len(answerable) :]
    golds = [set(t["gold_document_ids"]) for t in answerable]

    hybrid, ranked = _ranked(retriever, answerable, answer_vecs, golds, k, settings.rag_search_threshold)
    report: dict[str, Any] = {"k": k, "threshold": settings.rag_score_threshold,
                              "answerable_tasks": len(answerable), "unanswerable_tasks": len(unanswerable), **ranked}
    unanswerable_results = [
        retriever.search(t["question"], v, k)[0] for t, v in zip(unanswerable, unanswer_vecs, strict=True)
    ]
    report["unanswerable_retrieval_abstention"] = (
        sum(1 for r in unanswerable_results if not r) / len(unanswerable) if unanswerable else None
    )

    off_domain: list[tuple[str, np.ndarray]] = []
    context_pairs: list[tuple[dict[str, Any], list[Chunk]]] = []
    if unanswerable_path and Path(unanswerable_path).exists():
        # SQuAD-style questions about history, science, ...: off-domain for the bank's index.
        rows = _read_jsonl(Path(unanswerable_path))[:unanswerable_limit]
        off_vecs = embedder.embed([r["question"] for r in rows])
        off_domain = list(zip([r["question"] for r in rows], off_vecs, strict=True))
        report["off_domain_abstention"] = _abstention(retriever, off_domain, k)
        report["contexts"], context_pairs = eval_context_abstention(
            Path(unanswerable_path), settings, embedder=embedder, limit=unanswerable_limit, k=k
        )
    report["threshold_sweep"] = _threshold_sweep(retriever, answerable, answer_vecs, golds, off_domain, k)
    if llm is not None:

        async def generate() -> None:
            # One event loop for all generation: a client's connections belong to the loop that opened them.
            backend: ChatBackend = llm if hasattr(llm, "complete") else llm()  # type: ignore[assignment]
            try:
                report["generation"] = await _generation_metrics(
                    backend, answerable, unanswerable, hybrid, unanswerable_results, golds, settings
                )
                if context_pairs:
                    await _context_idk_rates(backend, context_pairs, report["contexts"], settings)
            finally:
                if backend is not llm:
                    await backend.aclose()

        asyncio.run(generate())
    return report


def _ranked(
    retriever: HybridRetriever, answerable: list[dict[str, Any]], vectors: np.ndarray, golds: list[set[str]], k: int,
    search_threshold: float,
) -> tuple[list[list[Chunk]], dict[str, Any]]:
    """The chat's top-k per task (gated), and the metrics of the hybrid as /v1/search serves it, as the chat retrieves,
    plain dense and plain BM25; the search time; the search's misses."""
    chat, hybrid, search_ms = [], [], []
    for task, vec in zip(answerable, vectors, strict=True):
        chunks, timings = retriever.search(task["question"], vec, k, threshold=search_threshold)
        hybrid.append(chunks)
        search_ms.append(timings.get("search_ms", 0.0))
        chat.append(retriever.search(task["question"], vec, k)[0])
    dense = [retriever.dense_search(vec, k) for vec in vectors]
    keyword = [retriever.keyword_search(t["question"], k) for t in answerable]
    return chat, {
        "hybrid": rank_metrics(hybrid, golds, k),
        "hybrid_chat": rank_metrics(chat, golds, k),
        "dense": rank_metrics(dense, golds, k),
        "bm25": rank_metrics(keyword, golds, k),
        "search_p50_ms": statistics.median(search_ms) if search_ms else 0.0,
        "misses": [
            t["question"] for t, c, g in zip(answerable, hybrid, golds, strict=True)
            if not any(x.document_id in g for x in c)
        ],
    }


def _abstention(
    retriever: HybridRetriever, questions: list[tuple[str, np.ndarray]], k: int, threshold: float | None = None
) -> float | None:
    """The share of `questions` for which retrieval returns nothing."""
    if not questions:
        return None
    return sum(1 for q, v in questions if not retriever.search(q, v, k, threshold=threshold)[0]) / len(questions)


def _threshold_sweep(
    retriever: HybridRetriever, answerable: list[dict[str, Any]], vectors: np.ndarray, golds: list[set[str]],
    off_domain: list[tuple[str, np.ndarray]], k: int,
) -> list[dict[str, Any]]:
    sweep = []
    for th in SWEEP:
        pairs = zip(answerable, vectors, strict=True)
        found = [retriever.search(t["question"], v, k, threshold=th)[0] for t, v in pairs]
        sweep.append({"threshold": th, f"recall@{k}": rank_metrics(found, golds, k)[f"recall@{k}"],
                      "off_domain_abstention": _abstention(retriever, off_domain, k, th)})
    return sweep


async def _answer(llm: ChatBackend, question: str, chunks: list[Chunk], settings: Any) -> tuple[str, list[Chunk]]:
    # The context the server would give (passages or whole chunks); the question's terms weigh alike here, where
    # the server weighs them by the live index's idf.
    prepared = build_messages(
        question, [], chunks, system_prompt=EVAL_SYSTEM_PROMPT, context_tokens=settings.rag_context_tokens,
        fit="chunks" if settings.rag_context_mode == "chunks" else "passages",
        min_context_tokens=settings.rag_context_min_tokens,
    )  # fmt: skip
    if prepared.no_context:
        return DEFAULT_IDK, []
    completion = await llm.complete(prepared.messages, GenerationOptions(max_tokens=200, temperature=0.0))
    return completion.text, prepared.sources


# The configured "I don't know" text and the ways a model says it in its own words ("the sources do not contain
# information about ..."): either way the customer got no answer.
_IDK_PHRASES = ("don't know", "do not know", "couldn't find", "could not find", "unable to find",
                "don't have information", "do not have information", "don't have any information",
                "do not have any information",
                "sources do not", "sources don't", "not mentioned in", "no information about", "no information on")


def is_idk(answer: str) -> bool:
    lowered = answer.lower().replace("\u2019", "'")
    return any(phrase in lowered for phrase in _IDK_PHRASES)


async def _generation_metrics(
    llm: ChatBackend,
    answerable: list[dict[str, Any]],
    unanswerable: list[dict[str, Any]],
    hybrid: list[list[Chunk]],
    unanswerable_results: list[list[Chunk]],
    golds: list[set[str]],
    settings: Any,
) -> dict[str, Any]:
    cited_total = cited_valid = cited_gold = correct = 0
    for task, chunks, gold in zip(answerable, hybrid, golds, strict=True):
        answer, sources = await _answer(llm, task["question"], chunks, settings)
        numbers = cited_numbers(answer)
        valid = [n for n in numbers if 1 <= n <= len(sources)]
        cited_total += len(numbers)
        cited_valid += len(valid)
        cited_gold += sum(1 for n in valid if sources[n - 1].document_id in gold)
        expected = task.get("answer_contains") or []
        correct += int(bool(expected) and all(e.lower() in answer.lower() for e in expected))
    idk = 0
    for task, chunks in zip(unanswerable, unanswerable_results, strict=True):
        answer, _ = await _answer(llm, task["question"], chunks, settings)
        idk += int(is_idk(answer))
    return {
        "citation_validity": cited_valid / cited_total if cited_total else None,  # cited ⊆ retrieved
        "citation_precision": cited_gold / cited_valid if cited_valid else None,  # cited sources that are gold
        "answers_with_citations": cited_total,
        "answer_accuracy": correct / len(answerable) if answerable else None,
        "idk_rate_unanswerable": idk / len(unanswerable) if unanswerable else None,
    }


def eval_context_abstention(
    path: Path, settings: Any, *, embedder: Embedder, limit: int = 60, k: int = 5
) -> tuple[dict[str, dict[str, Any]], list[tuple[dict[str, Any], list[Chunk]]]]:
    """unanswerable_dev.jsonl: question + a context paragraph; `answerable` says whether the context answers it.
    The contexts are ingested into a SEPARATE temp data dir (the real index is untouched); returns the
    retrieval-level abstention rate per label, and (row, retrieved chunks) pairs for generation."""
    everything = _read_jsonl(path)
    # The file is grouped by label: take up to limit/2 of each so both rates are measured.
    rows = [r for r in everything if r["answerable"]][: limit // 2] + [r for r in everything if not r["answerable"]][
        : limit - limit // 2
    ]
    with tempfile.TemporaryDirectory(prefix="guardchat-eval-") as tmp:
        root = Path(tmp)
        corpus = root / "knowledge"
        corpus.mkdir()
        contexts: dict[str, Path] = {}
        for row in rows:
            if row["context"] not in contexts:
                target = corpus / f"context-{len(contexts):04d}.txt"
                target.write_text(row["context"], encoding="utf-8")
                contexts[row["context"]] = target
        local = settings.model_copy(update={"data_dir": root / "data", "knowledge_dir": corpus})
        ingest(list(contexts.values()), local, embedder=embedder, progress=False)
        retriever = HybridRetriever(local)
        vectors = embedder.embed([r["question"] for r in rows])
        results = [retriever.search(r["question"], v, k)[0] for r, v in zip(rows, vectors, strict=True)]
    by_label: dict[str, dict[str, Any]] = {}
    for label, flag in (("answerable", True), ("unanswerable", False)):
        picked = [res for row, res in zip(rows, results, strict=True) if bool(row["answerable"]) == flag]
        by_label[label] = {
            "n": len(picked),
            "retrieval_abstention": sum(1 for r in picked if not r) / len(picked) if picked else None,
        }
    return by_label, list(zip(rows, results, strict=True))


async def _context_idk_rates(
    llm: ChatBackend,
    pairs: list[tuple[dict[str, Any], list[Chunk]]],
    by_label: dict[str, dict[str, Any]],
    settings: Any,
) -> None:
    for label, flag in (("answerable", True), ("unanswerable", False)):
        idk = n = 0
        for row, chunks in pairs:
            if bool(row["answerable"]) == flag:
                answer, _ = await _answer(llm, row["question"], chunks, settings)
                idk += int(is_idk(answer))
                n += 1
        by_label[label]["idk_rate"] = idk / n if n else None
