"""Hybrid retrieval: dense FAISS + sparse BM25, fused by reciprocal-rank fusion (RRF).

    dense   top-N by inner product of the caller's query embedding (computed once per turn)
    sparse  top-N by BM25 over a precomputed sparse matrix (app/rag/bm25.py; exact Okapi scores,
            sub-millisecond at 100k chunks, unlike rank-bm25's per-document Python loop)
    fuse    RRF: sum over the two lists of 1 / (10 + rank)
    long    a message of 3+ sentences with a question among them is keyword-searched by its question sentences,
            the rest at half weight (app/rag/long_query.py); the dense search keeps the whole message
    exact   a third RRF list: BM25 hits containing an exact identifier from the query (a product or
            error code like "LX-4471"), which dense embeddings barely distinguish
    gate    a query retrieves anything only if its best dense cosine >= `rag_score_threshold` (so an
            unrelated question retrieves nothing and the pipeline says "I don't know"), or it is just under
            it and its top BM25 chunk holds most of the query's idf mass (short keyword queries); then a
            chunk needs a dense cosine >= `rag_chunk_floor` (0.15). A chunk containing an exact identifier
            from the query is always kept (keyword evidence alone suffices for codes).
    filter  the optional retrieval rail (app/rag/filters.py) drops chunks that try to instruct the model.

`Chunk.score` is the dense cosine (comparable with the threshold); `Chunk.extra` carries the fused
`rrf` score and both ranks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.rag.base import Chunk, RetrievalResult
from app.rag.bm25 import Bm25Matrix
from app.rag.chunking import record_to_chunk
from app.rag.filters import ChunkFilter
from app.rag.index import CURRENT_FILE, IndexSnapshot, current_version, hnsw_ef_search, load_snapshot
from app.rag.long_query import split_message

log = logging.getLogger(__name__)

# Small k: a list's top ranks count much more than its middle. At 60 a chunk ranked ~15th by both lists outranked
# each list's first hit, so a question whose words are all generic ("my mother passed away, what do I need to do")
# lost its clear dense winner to chunks that BM25 matched on noise. Chosen on the dev sets, short and long, with
# and without 299 off-topic distractor documents (docs/rag.md "Long messages").
RRF_K = 10
MIN_CANDIDATES = 50
CANDIDATE_FACTOR = 10
# A query whose best cosine is within this margin under the threshold still counts as on-topic when the top
# BM25 chunk holds this share of its idf mass. Measured: bank keyword queries 0.69-1.0; none of 300
# off-domain SQuAD questions in the margin reaches 0.45.
KEYWORD_GATE_MARGIN = 0.1
KEYWORD_GATE_COVERAGE = 0.6
# A long message's keyword search: its question sentences count fully, the situation around them this much
# (app/rag/long_query.py). 0 (the question alone) lost the subject ("Is that allowed?"); 0.5 was best on dev.
LONG_CONTEXT_WEIGHT = 0.5
RELOAD_CHECK_S = 2.0  # how often a retrieve looks for a version written by another process (CLI ingest)
# Tokens with both letters and digits (and optional dashes): account types, product and error codes.
_IDENTIFIER = re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[a-z])[a-z0-9]+(?:[-/.][a-z0-9]+)*\b", re.IGNORECASE)


# Numbers with a unit or an ordinal are how people write ("3pm", "the 15th", "20k", "a 17-year-old", "24-month"),
# not codes: as identifiers they are substring-matched ("5th" in "25th birthday") and bypass the gate, so a long
# message's story would pull in chunks by its dates and ages.
_NUMBER_WITH_UNIT = re.compile(
    r"^\d+(?:[.,]\d+)?(?:st|nd|rd|th|am|pm|k|s|"
    r"(?:-(?:year|years|month|months|week|weeks|day|days|hour|hours|minute|minutes|old|mile|miles|digit|digits|"
    r"page|pages|percent|time|times))+)$",
    re.IGNORECASE,
)


def query_identifiers(query: str) -> list[str]:
    """Product and error codes in the query ("LM-403", "FIDO2", "1099-INT"), lowercased."""
    return [m.lower() for m in _IDENTIFIER.findall(query) if len(m) >= 3 and not _NUMBER_WITH_UNIT.match(m)]


def keyword_candidates(bm25: Bm25Matrix, query: str, n: int) -> list[tuple[int, float]]:
    """BM25 top-n; a long message is searched by what it asks, the situation around it weighted down (its story's
    words otherwise weigh as much as the question's)."""
    parts = split_message(query)
    if not parts.split:
        return bm25.top(query, n)
    return bm25.top_of(bm25.weighted_scores([(parts.asking, 1.0), (parts.context, LONG_CONTEXT_WEIGHT)]), n)


def _contains_identifier(record: dict[str, Any], identifiers: list[str]) -> bool:
    text = f"{record['title']} {record.get('section', '')} {record['content']}".lower()
    return any(ident in text for ident in identifiers)



class HybridRetriever:
    """Implements app.rag.base.Retriever. Thread-safe for concurrent reads; `reload()` swaps in a new
    index version atomically (in-flight searches finish on the snapshot they started with)."""

    def __init__(self, settings: Any, *, chunk_filter: ChunkFilter | None = None) -> None:
        self.settings = settings
        self.chunk_filter = chunk_filter
        self._reload_lock = threading.Lock()
        self._last_check = time.monotonic()
        self._snapshot = load_snapshot(self.index_dir, ef_search=hnsw_ef_search(settings))
        if chunk_filter is not None:  # the rail reuses the stored chunk embeddings instead of re-embedding each turn
            chunk_filter.use_stored_embeddings(self.embeddings_for)

    @property
    def index_dir(self) -> Path:
        path: Path = self.settings.index_dir
        return path

    @property
    def snapshot(self) -> IndexSnapshot:
        return self._snapshot

    @property
    def version(self) -> str | None:
        return self._snapshot.version

    def reload(self) -> bool:
        """Loads the live index version if it changed since the last load. Returns True when swapped."""
        with self._reload_lock:
            self._last_check = time.monotonic()
            if current_version(self.index_dir) == self._snapshot.version:
                return False
            self._snapshot = load_snapshot(self.index_dir, ef_search=hnsw_ef_search(self.settings))
            log.info("retriever loaded index version %s (%d chunks)", self._snapshot.version, len(self._snapshot))
            return True

    def _reload_due(self) -> bool:
        if time.monotonic() - self._last_check < RELOAD_CHECK_S:
            return False
        self._last_check = time.monotonic()
        pointer = self.index_dir / CURRENT_FILE
        return pointer.exists() and current_version(self.index_dir) != self._snapshot.version

    def documents(self) -> list[dict[str, Any]]:
        docs = self._snapshot.documents
        return [
            {k: v for k, v in entry.items() if k != "path"} | {"document_id": doc_id}
            for doc_id, entry in sorted(docs.items())
        ]

    def embeddings_for(self, chunks: list[Chunk]) -> np.ndarray | None:
        """The stored embeddings of `chunks` (no re-embedding), or None if one is not in the live index."""
        snap = self._snapshot
        found = [snap.row_of.get(c.id) for c in chunks]
        rows = [r for r in found if r is not None]
        if len(rows) != len(chunks):
            return None
        return np.asarray(snap.embeddings[rows], dtype=np.float32).reshape(len(chunks), -1)

    # --- search -----------------------------------------------------------------------------------------

    def dense_search(self, embedding: np.ndarray, k: int) -> list[Chunk]:
        """Plain dense top-k, no threshold (for the hybrid-vs-dense comparison in eval)."""
        snap = self._snapshot
        if not len(snap):
            return []
        query = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        scores, ids = snap.index.search(query, min(k, len(snap)))
        return [record_to_chunk(snap.chunks[i], float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def keyword_search(self, query: str, k: int) -> list[Chunk]:
        """Plain BM25 top-k, no threshold (for the eval's comparison); `score` is the BM25 score."""
        snap = self._snapshot
        return [record_to_chunk(snap.chunks[row], score) for row, score in snap.bm25.top(query, k)]

    def search(
        self, query: str, embedding: np.ndarray, k: int | None = None, *, threshold: float | None = None
    ) -> tuple[list[Chunk], dict[str, float]]:
        """Fused, thresholded top-k without the retrieval rail. Synchronous and fast (a few ms)."""
        k = k or self.settings.rag_top_k
        threshold = self.settings.rag_score_threshold if threshold is None else threshold
        snap = self._snapshot
        timings: dict[str, float] = {}
        if not len(snap) or k <= 0:
            return [], timings
        n_candidates = min(len(snap), max(MIN_CANDIDATES, k * CANDIDATE_FACTOR))
        qvec = np.asarray(embedding, dtype=np.float32).reshape(1, -1)

        t0 = time.perf_counter()
        dense_scores, dense_ids = snap.index.search(qvec, n_candidates)
        dense = [(int(i), float(s)) for i, s in zip(dense_ids[0], dense_scores[0], strict=True) if i >= 0]
        t1 = time.perf_counter()
        sparse = keyword_candidates(snap.bm25, query, n_candidates)
        t2 = time.perf_counter()

        bm25_weight = self.settings.rag_bm25_weight
        fused: dict[int, dict[str, float]] = {}
        for rank, (row, cosine) in enumerate(dense):
            fused[row] = {"rrf": 1.0 / (RRF_K + rank + 1), "dense_rank": rank + 1, "cosine": cosine}
        for rank, (row, bm25_score) in enumerate(sparse):
            entry = fused.setdefault(row, {"rrf": 0.0})
            entry["rrf"] += bm25_weight / (RRF_K + rank + 1)
            entry["bm25_rank"] = rank + 1
            entry["bm25"] = bm25_score
        # Third ranked list: BM25 hits that contain an exact identifier from the query ("BT-4004"), in BM25
        # order. Dense embeddings barely see codes, so without it a page that differs from its neighbours
        # only by the code would lose the fusion to them.
        identifiers = query_identifiers(query)
        if identifiers:
            exact = [row for row, _ in sparse if _contains_identifier(snap.chunks[row], identifiers)]
            for rank, row in enumerate(exact):
                fused[row]["rrf"] += 1.0 / (RRF_K + rank + 1)
                fused[row]["identifier_rank"] = rank + 1
        missing = [row for row, entry in fused.items() if "cosine" not in entry]
        if missing:  # BM25-only hits: their cosine from the stored embeddings (one small matmul)
            cosines = np.asarray(snap.embeddings[missing], dtype=np.float32) @ qvec[0]
            for row, cosine in zip(missing, cosines, strict=True):
                fused[row]["cosine"] = float(cosine)

        # Gate per query, floor per chunk: the question is on-topic when its best dense cosine reaches the
        # threshold (the same test that made the old per-chunk gate return nothing), and then a chunk the
        # keyword lists found needs only the lower floor. A per-chunk threshold dropped right chunks that BM25
        # ranked high but whose wording was far from the question's (hard dev set: recall@5 +2 points).
        floor = min(threshold, self.settings.rag_chunk_floor)
        best = dense[0][1] if dense else -1.0
        on_topic = best >= threshold
        keyword_gate = False
        if not on_topic and sparse and best >= threshold - KEYWORD_GATE_MARGIN:
            # Short keyword queries ("CFPB", "drive-through lanes") embed poorly: let them in when the best
            # keyword hit holds most of the query's information and the embedding is not far off.
            keyword_gate = on_topic = snap.bm25.coverage(query, sparse[0][0]) >= KEYWORD_GATE_COVERAGE
        results: list[Chunk] = []
        for row, entry in sorted(fused.items(), key=lambda item: -item[1]["rrf"]):
            record = snap.chunks[row]
            if "identifier_rank" not in entry and not (on_topic and entry["cosine"] >= floor):
                continue
            extra: dict[str, Any] = {k_: (int(v) if k_.endswith("_rank") else round(v, 6)) for k_, v in entry.items()}
            if keyword_gate:
                extra["gate"] = "keyword"
            extra["matched"] = (
                "both"
                if "dense_rank" in entry and "bm25_rank" in entry
                else ("dense" if "dense_rank" in entry else "keyword")
            )
            results.append(record_to_chunk(record, entry["cosine"], extra))
            if len(results) == k:
                break
        t3 = time.perf_counter()
        timings.update(
            dense_ms=(t1 - t0) * 1e3, bm25_ms=(t2 - t1) * 1e3, fuse_ms=(t3 - t2) * 1e3, search_ms=(t3 - t0) * 1e3
        )
        return results, timings

    async def retrieve_detailed(
        self, query: str, embedding: np.ndarray, k: int | None = None, *, threshold: float | None = None
    ) -> RetrievalResult:
        """Search, then the retrieval rail: dropped chunks are replaced by the next candidates."""
        if self._reload_due():
            await asyncio.to_thread(self.reload)
        k = k or self.settings.rag_top_k
        started = time.perf_counter()
        # Over-fetch so chunks dropped by the rail can be replaced without a second search.
        fetch = k * 2 if self.chunk_filter else k
        candidates, timings = self.search(query, embedding, fetch, threshold=threshold)
        result = RetrievalResult(candidates[:k], [], timings)
        if self.chunk_filter and candidates:
            filter_started = time.perf_counter()
            # Verdicts known for the top k: no thread hop. (The over-fetched rest is scored only when a top chunk
            # is dropped, so asking about all of them would never find them cached.)
            if self.chunk_filter.is_cached(candidates[:k]):
                result.chunks, result.dropped = self._apply_filter(candidates, k)
            else:
                result.chunks, result.dropped = await asyncio.to_thread(self._apply_filter, candidates, k)
            timings["filter_ms"] = (time.perf_counter() - filter_started) * 1e3
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return result

    def _apply_filter(self, candidates: list[Chunk], k: int) -> tuple[list[Chunk], list[tuple[Chunk, str, float]]]:
        assert self.chunk_filter is not None
        kept: list[Chunk] = []
        dropped: list[tuple[Chunk, str, float]] = []
        position = 0
        while len(kept) < k and position < len(candidates):
            batch = candidates[position : position + (k - len(kept))]
            position += len(batch)
            try:
                verdicts = self.chunk_filter(batch)
            except Exception as exc:  # fail closed: an unscreened chunk never reaches the prompt
                log.error("retrieval rail failed: %s", exc)
                dropped.extend(
                    (c, f"rail_error: {type(exc).__name__}", 1.0) for c in candidates[position - len(batch) :]
                )
                break
            for chunk, verdict in zip(batch, verdicts, strict=True):
                if verdict.keep:
                    kept.append(chunk)
                else:
                    chunk.extra["dropped"] = verdict.reason
                    dropped.append((chunk, verdict.reason, verdict.score))
        return kept, dropped

    async def retrieve(self, query: str, embedding: np.ndarray, k: int) -> list[Chunk]:
        return (await self.retrieve_detailed(query, embedding, k)).chunks
