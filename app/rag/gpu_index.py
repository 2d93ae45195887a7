"""Dense search on the GPU when faiss has GPU support and a GPU is present; otherwise the CPU index, logged once.

Which index serves a snapshot (`gpu_plan`):
- no GPU faiss (the default `faiss-cpu` install) or no CUDA device: the CPU index from disk, unchanged
  (exact flat up to `rag_exact_max_vectors`, HNSW above);
- up to GPU_EXACT_MAX_VECTORS: exact inner product on the GPU (GpuIndexFlatIP). At 1M chunks x 384 floats
  (1.5 GB) one query is a single pass over the vectors at HBM bandwidth, well under a millisecond, with
  recall 1.0, so an approximate index buys nothing there;
- above: GpuIndexIVFFlat with nlist ~ 4 sqrt(n), its nprobe the smallest of NPROBE_STEPS whose recall@10
  against exact search reaches IVF_RECALL_TARGET on probe queries (the recall check bench/faiss_bench.py and
  tests/rag use for HNSW); if none does, exact search on the GPU.

The GPU index is built from the version's stored embeddings at load time; the file on disk stays the CPU
index, so one index directory serves CPU and GPU replicas alike. FAISS GPU indexes are not thread-safe, even
for search, so each is wrapped in LockedGpuIndex.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Literal

import faiss
import numpy as np

log = logging.getLogger(__name__)

GpuPlan = Literal["cpu", "gpu-flat", "gpu-ivf"]

GPU_EXACT_MAX_VECTORS = 2_000_000
IVF_RECALL_TARGET = 0.99
NPROBE_STEPS = (8, 16, 32, 64, 128, 256)
PROBE_QUERIES = 200
RECALL_K = 10

_cpu_fallback_logged = False
# The faiss-cpu type stubs (what mypy sees here) lack the GPU IVF classes that the faiss-gpu build has.
_gpu_faiss: Any = faiss


class LockedGpuIndex:
    """A FAISS GPU index searched by one thread at a time. `kind` is "gpu-flat" or "gpu-ivf"."""

    def __init__(self, index: Any, kind: GpuPlan) -> None:
        self.index = index
        self.kind = kind
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids


def faiss_gpu_count() -> int:
    """GPUs FAISS can use: 0 with the faiss-cpu build (no GPU symbols at all) or with no CUDA device."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:  # a GPU build without a working driver
        return 0


def gpu_plan(n_vectors: int, gpus: int, *, exact_max: int = GPU_EXACT_MAX_VECTORS) -> GpuPlan:
    if gpus < 1:
        return "cpu"
    return "gpu-flat" if n_vectors <= exact_max else "gpu-ivf"


def ivf_nlist(n_vectors: int) -> int:
    """~4 sqrt(n) lists (FAISS's guideline for 1M-10M vectors), at most n / 39 so that every list gets the
    39 training points k-means wants."""
    return max(1, min(int(4 * math.sqrt(n_vectors)), n_vectors // 39))


def probe_queries(vectors: np.ndarray, count: int = PROBE_QUERIES, seed: int = 0) -> np.ndarray:
    """Queries for the recall check: normalised midpoints of random pairs of stored vectors. A stored vector
    as its own query always finds its own list, which flatters IVF; a midpoint lies between documents, as
    real questions do."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    pairs = rng.integers(0, n, size=(count, 2))
    mids = (np.asarray(vectors[pairs[:, 0]], np.float32) + np.asarray(vectors[pairs[:, 1]], np.float32)) / 2
    return mids / np.maximum(np.linalg.norm(mids, axis=1, keepdims=True), 1e-12)


def recall_at_k(index: Any, exact: Any, queries: np.ndarray, k: int = RECALL_K) -> float:
    """The mean fraction of `exact`'s top-k that `index` also returns for `queries`."""
    k = min(k, int(exact.ntotal))
    if k == 0 or len(queries) == 0:
        return 1.0
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
    return hits / (k * len(queries))


def choose_nprobe(
    ivf: Any,
    exact: Any,
    queries: np.ndarray,
    *,
    target: float = IVF_RECALL_TARGET,
    steps: tuple[int, ...] = NPROBE_STEPS,
) -> tuple[int | None, float]:
    """Sets `ivf.nprobe` to the smallest step whose recall@10 reaches `target`; (None, best recall) when
    none does. Works on CPU and GPU IVF indexes alike (both have `nprobe`)."""
    best = 0.0
    for nprobe in steps:
        ivf.nprobe = min(nprobe, ivf.nlist)
        recall = recall_at_k(ivf, exact, queries)
        best = max(best, recall)
        if recall >= target:
            return nprobe, recall
    return None, best


def maybe_to_gpu(index: Any, vectors: np.ndarray | None = None, *, device: int = 0) -> Any:
    """The GPU index `gpu_plan` picks for this snapshot, or `index` unchanged (CPU) with one log line saying
    why. `vectors` (row i = FAISS id i) are needed to build a GPU index from an HNSW one."""
    gpus = faiss_gpu_count()
    plan = gpu_plan(int(index.ntotal), gpus)
    if plan == "cpu":
        _log_cpu_fallback(index)
        return index
    try:
        resources = faiss.StandardGpuResources()
        if isinstance(index, faiss.IndexFlat):
            exact = faiss.index_cpu_to_gpu(resources, device, index)
        elif vectors is None:
            raise ValueError("an HNSW index moves to the GPU only with its stored vectors")
        else:
            exact = _gpu_flat(resources, device, vectors)
        if plan == "gpu-flat":
            log.info("dense search on GPU %d: exact inner product over %d vectors", device, exact.ntotal)
            return LockedGpuIndex(exact, "gpu-flat")
        return _gpu_ivf_or_exact(resources, device, vectors if vectors is not None else _flat_vectors(index), exact)
    except Exception as exc:  # a broken CUDA setup or a full GPU must not take retrieval down: CPU search works
        log.warning("faiss GPU index failed, searching on the CPU: %s", exc)
        return index


def _log_cpu_fallback(index: Any) -> None:
    global _cpu_fallback_logged
    if _cpu_fallback_logged:
        return
    _cpu_fallback_logged = True
    why = "this faiss build has no GPU support (faiss-cpu)" if not hasattr(faiss, "StandardGpuResources") else (
        "faiss sees no CUDA device"
    )
    kind = "HNSW" if isinstance(index, faiss.IndexHNSW) else "exact flat"
    log.info("dense search on the CPU (%s index): %s", kind, why)


def _gpu_flat(resources: Any, device: int, vectors: np.ndarray) -> Any:
    config = faiss.GpuIndexFlatConfig()
    config.device = device
    flat = faiss.GpuIndexFlatIP(resources, int(vectors.shape[1]), config)
    for start in range(0, len(vectors), 1_000_000):  # bounded host copies of an mmap'd embeddings.npy
        flat.add(np.ascontiguousarray(vectors[start : start + 1_000_000], dtype=np.float32))
    return flat


def _flat_vectors(index: Any) -> np.ndarray:
    return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def _gpu_ivf_or_exact(resources: Any, device: int, vectors: np.ndarray, exact: Any) -> LockedGpuIndex:
    n, dim = int(vectors.shape[0]), int(vectors.shape[1])
    nlist = ivf_nlist(n)
    config = _gpu_faiss.GpuIndexIVFFlatConfig()
    config.device = device
    ivf = _gpu_faiss.GpuIndexIVFFlat(resources, dim, nlist, faiss.METRIC_INNER_PRODUCT, config)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
    ivf.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    for start in range(0, n, 1_000_000):
        ivf.add(np.ascontiguousarray(vectors[start : start + 1_000_000], dtype=np.float32))
    nprobe, recall = choose_nprobe(ivf, exact, probe_queries(vectors))
    if nprobe is None:
        log.warning("GPU IVF (nlist %d) reached recall@10 %.3f < %.2f: exact search on GPU %d instead",
                    nlist, recall, IVF_RECALL_TARGET, device)
        return LockedGpuIndex(exact, "gpu-flat")
    del exact  # frees its GPU copy of the vectors
    log.info("dense search on GPU %d: IVF over %d vectors, nlist %d, nprobe %d, recall@10 %.3f vs exact",
             device, n, nlist, nprobe, recall)
    return LockedGpuIndex(ivf, "gpu-ivf")
