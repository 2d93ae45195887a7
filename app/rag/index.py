"""The on-disk index: FAISS vectors + docstore + BM25 matrix + manifest, one immutable version per ingest.

Layout under `settings.index_dir`:

    CURRENT                  name of the live version (replaced atomically with os.replace)
    versions/<version>/      index.faiss, embeddings.npy, chunks.jsonl, bm25.npz, bm25_vocab.json, manifest.json
    versions/.tmp-<uuid>/    a version being written (ignored by readers, removed by the next ingest)
    .lock                    flock held by the one ingest allowed at a time (across processes)

A reader resolves CURRENT once and reads one complete version, so an ingest killed at any point
leaves the previous version live and intact. Row i of the FAISS index is row i of chunks.jsonl and
of embeddings.npy (kept for incremental rebuilds, recall checks and the groundedness rail).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from app.rag.bm25 import TOKENIZER_VERSION, Bm25Matrix
from app.rag.chunking import search_text
from app.rag.gpu_index import LockedGpuIndex, maybe_to_gpu

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = ["maybe_to_gpu"]  # re-exported: callers load snapshots through this module

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
# IndexFlatIP (exact) up to this many chunks, HNSW above. Exact search reads every vector: at 10k chunks a
# 384-d scan is ~1 ms, and more right after a query embedding has evicted the vectors from the cache, while
# HNSW at efSearch 128 takes 0.24 ms with recall@10 1.0 against exact on the 10k benchmark corpus.
EXACT_MAX_VECTORS = 5_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


def exact_max_vectors(settings: Settings) -> int:
    return settings.rag_exact_max_vectors


def hnsw_ef_search(settings: Settings) -> int:
    return settings.rag_hnsw_ef_search


def build_faiss_index(vectors: np.ndarray, *, exact_max: int = EXACT_MAX_VECTORS) -> faiss.Index:
    """Exact inner product (= cosine on normalised vectors) up to `exact_max` vectors, HNSW above."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if vectors.shape[0] <= exact_max:
        index: faiss.Index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if vectors.shape[0]:
        index.add(vectors)
    return index


def index_kind(index: faiss.Index | LockedGpuIndex) -> str:
    """The kind of a CPU index ("flat", "hnsw") or of one on the GPU ("gpu-flat", "gpu-ivf": app/rag/gpu_index.py)."""
    if isinstance(index, LockedGpuIndex):
        return index.kind
    return "hnsw" if isinstance(index, faiss.IndexHNSW) else "flat"


def measure_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """recall@k of `index` against exact inner-product search over the same `vectors`:
    the mean fraction of the true top-k neighbours that `index` returns."""
    if len(vectors) == 0 or len(queries) == 0:
        return 1.0
    k = min(k, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
    return hits / (k * len(queries))


@dataclass
class IndexSnapshot:
    """One loaded, immutable index version. Retrievers swap the whole object on reload."""

    version: str | None
    chunks: list[dict[str, Any]]
    embeddings: np.ndarray
    index: faiss.Index | LockedGpuIndex
    bm25: Bm25Matrix
    manifest: dict[str, Any] = field(default_factory=dict)
    row_of: dict[str, int] = field(default_factory=dict)
    bm25_rebuilt: bool = False  # the stored BM25 used another tokenizer: rebuilt in memory, not yet on disk

    @classmethod
    def empty(cls, dim: int = 384) -> IndexSnapshot:
        empty_vectors = np.zeros((0, dim), dtype=np.float32)
        return cls(None, [], empty_vectors, faiss.IndexFlatIP(dim), Bm25Matrix.build([]), {"documents": {}})

    @property
    def documents(self) -> dict[str, dict[str, Any]]:
        docs: dict[str, dict[str, Any]] = self.manifest.get("documents", {})
        return docs

    def __len__(self) -> int:
        return len(self.chunks)


def current_version(index_dir: Path) -> str | None:
    try:
        name = (index_dir / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name or None


def load_snapshot(index_dir: Path, *, ef_search: int = HNSW_EF_SEARCH, gpu: bool = True) -> IndexSnapshot:
    """Loads the live version (an empty snapshot when nothing was ingested yet)."""
    for attempt in range(3):
        version = current_version(index_dir)
        if version is None:
            return IndexSnapshot.empty()
        directory = index_dir / VERSIONS_DIR / version
        try:
            return _load_version(directory, version, ef_search=ef_search, gpu=gpu)
        except FileNotFoundError:
            # An ingest in another process swapped CURRENT and garbage-collected this version meanwhile.
            if attempt == 2:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def bm25_is_current(manifest: dict[str, Any]) -> bool:
    """Was this version's BM25 matrix built by the running code's tokenizer? (Versions written before the
    tokenizer was versioned have no key: they used tokenizer 1.)"""
    return bool(manifest.get("bm25_tokenizer", 1) == TOKENIZER_VERSION)


def _load_version(directory: Path, version: str, *, ef_search: int, gpu: bool) -> IndexSnapshot:
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    with (directory / "chunks.jsonl").open(encoding="utf-8") as fh:
        chunks = [json.loads(line) for line in fh if line.strip()]
    embeddings = np.load(directory / "embeddings.npy", mmap_mode="r")
    index = faiss.read_index(str(directory / "index.faiss"))
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search
    if gpu:  # GPU faiss + a GPU: exact or IVF search there (app/rag/gpu_index.py); else this CPU index, logged
        index = maybe_to_gpu(index, embeddings)
    stale = not bm25_is_current(manifest)
    if stale:
        # Query tokens must match the stored ones (a stemmed query finds nothing in an unstemmed matrix),
        # so rebuild from the docstore; the next ingest writes it to disk (app/rag/ingest.py).
        log.warning(
            "index version %s has BM25 tokenizer %s, not %s: rebuilding it in memory; run "
            "`guardchat ingest` to store it",
            version,
            manifest.get("bm25_tokenizer", 1),
            TOKENIZER_VERSION,
        )
        bm25 = Bm25Matrix.build([search_text(c) for c in chunks])
    else:
        bm25 = Bm25Matrix.load(directory)
    if not (len(chunks) == embeddings.shape[0] == index.ntotal == bm25.n_docs):
        raise ValueError(f"index version {version} is inconsistent: sizes differ")
    row_of = {chunk["id"]: row for row, chunk in enumerate(chunks)}
    return IndexSnapshot(version, chunks, embeddings, index, bm25, manifest, row_of, bm25_rebuilt=stale)


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_version(
    index_dir: Path,
    *,
    chunks: list[dict[str, Any]],
    embeddings: np.ndarray,
    index: faiss.Index | LockedGpuIndex,
    bm25: Bm25Matrix,
    manifest: dict[str, Any],
) -> str:
    """Writes a complete new version into a temp dir, renames it into place, then swaps CURRENT.
    Each step is atomic, so a crash leaves either the old or the new version live, never a mix."""
    versions = index_dir / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    version = f"v{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    tmp = versions / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        faiss.write_index(_cpu_copy(index), str(tmp / "index.faiss"))
        np.save(tmp / "embeddings.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
        lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks)
        _fsync_write(tmp / "chunks.jsonl", lines.encode("utf-8"))
        bm25.save(tmp)
        manifest = {
            **manifest,
            "version": version,
            "count": len(chunks),
            "index_kind": index_kind(index),
            "bm25_tokenizer": TOKENIZER_VERSION,  # bm25 is always built with the running code's tokenizer
        }
        _fsync_write(tmp / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
        tmp.rename(versions / version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = index_dir / f".{CURRENT_FILE}.{uuid.uuid4().hex}"
    _fsync_write(pointer_tmp, version.encode("utf-8"))
    os.replace(pointer_tmp, index_dir / CURRENT_FILE)
    return version


def _cpu_copy(index: faiss.Index | LockedGpuIndex) -> faiss.Index:
    if isinstance(index, LockedGpuIndex):
        return faiss.index_gpu_to_cpu(index.index)
    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def collect_garbage(index_dir: Path, keep: set[str]) -> None:
    """Removes old versions and leftovers of interrupted ingests. Called with the ingest lock held;
    `keep` holds the live version and the previous one (a reader may still be loading it)."""
    versions = index_dir / VERSIONS_DIR
    if not versions.is_dir():
        return
    for entry in versions.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
    for stray in index_dir.glob(f".{CURRENT_FILE}.*"):
        stray.unlink(missing_ok=True)


@contextlib.contextmanager
def ingest_lock(index_dir: Path) -> Iterator[None]:
    """One ingest at a time per index dir, across threads and processes (each call opens its own fd,
    and flock locks are per open file, so threads of one process exclude each other too)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with (index_dir / ".lock").open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
