"""Where retrieval runs: MiniLM and the FAISS index on a GPU when one is usable, else the CPU with a log line.

There is no GPU here (nor in CI), so these tests run the real selection code down its CPU branch and check
the fallback and its log line; the GPU branches run in bench/gpu_retrieval.py on a GPU machine
(docs/benchmarks.md). Where a test finds a GPU after all, it checks the GPU choice instead.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from app.rag import gpu_index
from app.rag.bm25 import Bm25Matrix
from app.rag.embedder import (
    CUDA_BULK_BATCH,
    MiniLMEmbedder,
    cuda_device_count,
    resolve_cuda_precision,
    resolve_precision,
    select_device,
)
from app.rag.gpu_index import (
    LockedGpuIndex,
    choose_nprobe,
    faiss_gpu_count,
    gpu_plan,
    ivf_nlist,
    maybe_to_gpu,
    probe_queries,
    recall_at_k,
)
from app.rag.index import build_faiss_index, index_kind, load_snapshot, write_version
from app.rag.ingest import EMBED_BATCH, embed_batched

HAS_CUDA = cuda_device_count() > 0
HAS_FAISS_GPU = faiss_gpu_count() > 0


def _unit(rows: int, dim: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if clusters:  # documents gather around topics, as real chunk embeddings do
        centres = rng.normal(size=(clusters, dim))
        vectors = centres[rng.integers(0, clusters, rows)] + 0.35 * rng.normal(size=(rows, dim))
    else:
        vectors = rng.normal(size=(rows, dim))
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# --- the embedder ---------------------------------------------------------------------------------


def test_auto_device_is_the_gpu_when_torch_sees_one_else_the_cpu_with_a_log_line(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="app.rag.embedder"):
        device = select_device("auto")
    if HAS_CUDA:
        assert device == "cuda"
    else:
        assert device == "cpu"
        assert any("MiniLM embeds on the CPU" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_asking_for_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_run() -> None:
    with pytest.raises(RuntimeError, match="embed_device=cuda"):
        select_device("cuda")
    assert select_device("cpu") == "cpu"


def test_precision_per_device() -> None:
    assert resolve_cuda_precision("auto") == "float16"
    assert resolve_cuda_precision("float32") == "float32"
    assert resolve_precision("float16") == "float32"  # fp16 on a CPU is emulated: never chosen there


def test_cpu_embedder_keeps_the_small_ingest_batch_and_a_gpu_one_asks_for_more() -> None:
    embedder = MiniLMEmbedder(device="cpu", precision="float32")
    assert embedder.device == "cpu" and embedder.bulk_batch is None

    class RecordingEmbedder:
        """The real MiniLM, recording how many texts each call hands it."""

        dim = embedder.dim

        def __init__(self, bulk_batch: int | None) -> None:
            self.bulk_batch = bulk_batch
            self.calls: list[int] = []

        def embed(self, texts: list[str]) -> np.ndarray:
            self.calls.append(len(texts))
            return embedder.embed(texts)

    texts = [f"chunk {i} about wire transfer fees" + " and limits" * (i % 5) for i in range(21)]
    cpu_like, gpu_like = RecordingEmbedder(None), RecordingEmbedder(CUDA_BULK_BATCH)
    cpu_vectors = embed_batched(cpu_like, texts, progress=False)
    gpu_vectors = embed_batched(gpu_like, texts, progress=False)
    assert cpu_like.calls == [EMBED_BATCH, EMBED_BATCH, 21 - 2 * EMBED_BATCH]
    assert gpu_like.calls == [21]
    np.testing.assert_allclose(cpu_vectors, gpu_vectors, atol=1e-5)  # same rows, in input order


# --- the FAISS index ------------------------------------------------------------------------------


def test_gpu_plan() -> None:
    assert gpu_plan(10, gpus=0) == "cpu"
    assert gpu_plan(3_000_000, gpus=0) == "cpu"
    assert gpu_plan(1_000_000, gpus=1) == "gpu-flat"
    assert gpu_plan(1_000_001, gpus=1, exact_max=1_000_000) == "gpu-ivf"
    assert ivf_nlist(1_000_000) == 4000 and ivf_nlist(1000) == 25 and ivf_nlist(10) == 1


@pytest.mark.skipif(HAS_FAISS_GPU, reason="faiss has a GPU here")
@pytest.mark.parametrize("rows", [50, 400])
def test_without_gpu_faiss_the_cpu_index_serves_and_says_so(monkeypatch, caplog, rows: int) -> None:
    monkeypatch.setattr(gpu_index, "_cpu_fallback_logged", False)  # logged once per process: reset for the test
    vectors = _unit(rows, 32)
    index = build_faiss_index(vectors, exact_max=100)
    with caplog.at_level(logging.INFO, logger="app.rag.gpu_index"):
        served = maybe_to_gpu(index, vectors)
    assert served is index
    expected_kind = "exact flat" if rows <= 100 else "HNSW"
    why = "faiss-cpu" if not hasattr(faiss, "StandardGpuResources") else "no CUDA device"
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"dense search on the CPU ({expected_kind} index)" in m and why in m for m in messages), messages


@pytest.mark.skipif(HAS_FAISS_GPU, reason="faiss has a GPU here")
def test_a_loaded_snapshot_searches_on_the_cpu_here(tmp_path) -> None:
    vectors = _unit(300, 32, seed=1)
    chunks = [{"id": f"c{i}", "document_id": f"d{i}", "text": f"text {i}"} for i in range(len(vectors))]
    write_version(
        tmp_path, chunks=chunks, embeddings=vectors, index=build_faiss_index(vectors, exact_max=100),
        bm25=Bm25Matrix.build([c["text"] for c in chunks]), manifest={"documents": {}},
    )
    snapshot = load_snapshot(tmp_path)  # gpu=True: the server's path
    assert index_kind(snapshot.index) == "hnsw" and not isinstance(snapshot.index, LockedGpuIndex)
    _, ids = snapshot.index.search(vectors[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_locked_index_searches_like_the_index_it_wraps() -> None:
    vectors = _unit(200, 16, seed=2)
    flat = build_faiss_index(vectors)
    locked = LockedGpuIndex(flat, "gpu-flat")
    assert (locked.ntotal, locked.d, index_kind(locked)) == (200, 16, "gpu-flat")
    np.testing.assert_array_equal(locked.search(vectors[:3], 4)[1], flat.search(vectors[:3], 4)[1])


def test_probe_queries_are_unit_midpoints_of_stored_vectors() -> None:
    vectors = _unit(100, 16, seed=3)
    queries = probe_queries(vectors, count=50)
    assert queries.shape == (50, 16)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    assert not any(np.allclose(q, v) for q in queries[:5] for v in vectors)


def test_nprobe_is_the_smallest_step_that_reaches_the_recall_target() -> None:
    """The same search for nprobe runs on CPU and GPU IVF indexes; here on the CPU one."""
    vectors = _unit(8000, 32, seed=4, clusters=40)
    exact = faiss.IndexFlatIP(32)
    exact.add(vectors)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, ivf_nlist(len(vectors)), faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add(vectors)
    queries = probe_queries(vectors)
    steps = (1, 2, 4, 8, 16, 32, 64, 128)
    nprobe, recall = choose_nprobe(ivf, exact, queries, target=0.95, steps=steps)
    assert nprobe is not None and nprobe > 1 and recall >= 0.95 and ivf.nprobe == nprobe
    ivf.nprobe = steps[steps.index(nprobe) - 1]
    assert recall_at_k(ivf, exact, queries) < 0.95  # the step below misses the target
    assert choose_nprobe(ivf, exact, queries, target=1.01, steps=steps)[0] is None  # unreachable: caller goes exact


def test_a_cpu_torch_is_recognised_without_importing_torch() -> None:
    """The CPU server embeds with OpenVINO and never imports torch; choosing the device must not import it."""
    import subprocess
    import sys

    code = ("import sys; from app.rag.embedder import select_device, torch_is_cpu_build; "
            "print(torch_is_cpu_build(), select_device('auto'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import torch

    cpu_build = torch.version.cuda is None
    assert out[0] == str(cpu_build)
    if cpu_build:  # this machine: the CPU wheel
        assert out[1:] == ["cpu", "False"]
