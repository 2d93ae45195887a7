"""The fine-tuned guard: all-MiniLM-L6-v2 trained end to end with one multi-head output, run int8 on OpenVINO.

One encoder pass per text gives every score the rails need:
- `unsafe`: the text is a harmful request or harmful content (binary, Platt-calibrated);
- `categories`: the Llama Guard 3 hazard categories S1-S14 (multi-label, P(category | unsafe));
- `attack`: jailbreak, prompt injection or system-prompt extraction (binary, calibrated);
- `topic`: on_domain / investment, legal, tax advice / off_topic (softmax).

The weights ship in app/guard/weights/guard_model/ (OpenVINO IR with int8 weights, the tokenizer, the
calibration and thresholds in guard.json), made by `guardchat guard train` (training/finetune*.py). Nothing
is fetched at run time. Inference runs at f32 precision on every CPU (no bf16 where the CPU has it), so a text
gets the same scores under any load and the same verdict on any x86 machine.

Long texts keep their head and their tail (jailbreak templates put the request at the end): one pass,
at most MAX_TOKENS tokens, whatever the length.

One pass, two answers: the graph's bottom layers are the pretrained MiniLM's (only the top ones were
fine-tuned), and a second branch of pretrained top layers gives the retrieval embedding of the same text
(`embedding`). A turn's guard check and its query embedding read the user's message once, not twice: two
encoders, each alone cheap, took turns in a 2-core machine's caches and cost a third of the throughput
(docs/benchmarks.md). `_Passes` makes the second of the two callers wait for the first one's pass.

This module imports only numpy and tokenizers at the top: the training code on a GPU machine shares
`encode_ids` and the label lists with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.guard.base import DetectorScores

log = logging.getLogger(__name__)

CATEGORY_CODES = tuple(f"S{i}" for i in range(1, 15))
TOPIC_LABELS = ("on_domain", "investment_advice", "legal_advice", "tax_advice", "off_topic")
# Output columns of the network: [unsafe, attack, S1..S14, topic logits...]
UNSAFE_COL, ATTACK_COL = 0, 1
CATS = slice(2, 2 + len(CATEGORY_CODES))
TOPICS = slice(2 + len(CATEGORY_CODES), 2 + len(CATEGORY_CODES) + len(TOPIC_LABELS))
N_OUTPUTS = TOPICS.stop

# With [CLS] and [SEP]. 256 until session 10: 192 decided every held-out row alike (same verdict hash) and cuts the
# longest pass by a quarter (the model was trained on 256-token windows; the next fit trains on 192).
MAX_TOKENS = 192
HEAD_TOKENS = 72  # a long text keeps its first HEAD_TOKENS and its last MAX_TOKENS - 2 - HEAD_TOKENS
# From this many tokens a text runs the guard branch alone, on several threads, and is embedded for retrieval
# by the retrieval embedder at the same time (docs/guard-classifier.md "Latency"). On one thread the shared
# pass cost ~0.7 ms a token on a 2-core AVX2 machine: a 256-token jailbreak took ~180 ms, the tail of p99.
LONG_TOKENS = 48
LONG_PASS_THREADS = 2  # at least: a long text's pass is split over this many cores (all of them, up to 4)
# The same arithmetic on every CPU, so the same verdict. f32: OpenVINO would pick bf16 where the CPU has it. No
# dynamic quantization: where the CPU has int8 dot products (AVX-512 VNNI, AMX) OpenVINO's default quantizes the
# activations entering int8-weight layers to int8, in groups of 32, on the fly; an AVX2-only CPU keeps them f32.
# With that default an AVX2 EPYC blocked 15 of 15 held-out extractions, an AVX-512 Xeon and a Zen 5 14 of 15.
SAME_ON_EVERY_CPU: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
GUARD_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "guard_model"
META_FILE = "guard.json"
IR_FILE = "guard.xml"
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: Path) -> Any:
    """The MiniLM WordPiece tokenizer from its tokenizer.json, with no truncation or padding of its own."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def encode_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids with [CLS]/[SEP]; texts over MAX_TOKENS keep their head and tail (the same in training)."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    budget = MAX_TOKENS - 2
    out = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        if len(ids) > budget:
            ids = ids[:HEAD_TOKENS] + ids[len(ids) - (budget - HEAD_TOKENS) :]
        out.append([cls_id, *ids, sep_id])
    return out


def in_window(tokenizer: Any, text: str, part: str) -> bool:
    """True if `part` (a stretch of `text` between spaces) survives the head-and-tail cut of `encode_ids`."""
    kept = encode_ids(tokenizer, [text])[0]
    needle = encode_ids(tokenizer, [part])[0][1:-1]
    return any(kept[i : i + len(needle)] == needle for i in range(len(kept) - len(needle) + 1))


def pad_batch(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded input_ids and attention_mask (int64), as wide as the longest text."""
    width = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return input_ids, mask


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class GuardWeightsMismatch(RuntimeError):
    """guard.bin is not the file guard.json was calibrated for: the server must not start on it."""


def weights_sha256(directory: Path) -> str:
    return hashlib.sha256((Path(directory) / IR_FILE.replace(".xml", ".bin")).read_bytes()).hexdigest()


def verify_weights(directory: Path, meta: dict[str, Any]) -> None:
    actual = weights_sha256(directory)
    if meta.get("weights_sha256") != actual:
        raise GuardWeightsMismatch(
            f"{directory}: guard.bin sha256 {actual[:16]}… is not the one guard.json records; "
            "retrain with `guardchat guard train` (thresholds are calibrated for one set of weights)"
        )


@dataclass(frozen=True)
class Calibration:
    """Platt scaling per binary head (a * logit + b), fitted on the validation split of the training data."""

    unsafe: tuple[float, float] = (1.0, 0.0)
    attack: tuple[float, float] = (1.0, 0.0)


def probabilities(logits: np.ndarray, cal: Calibration) -> dict[str, np.ndarray]:
    """Network outputs (n, N_OUTPUTS) -> calibrated probabilities per head."""
    return {
        "unsafe": sigmoid(cal.unsafe[0] * logits[:, UNSAFE_COL] + cal.unsafe[1]),
        "attack": sigmoid(cal.attack[0] * logits[:, ATTACK_COL] + cal.attack[1]),
        "categories": sigmoid(logits[:, CATS]),
        "topic": softmax(logits[:, TOPICS]),
    }


@dataclass(frozen=True)
class Pass:
    """One text's pass: the network's outputs, and its retrieval embedding (L2-normalised) when the graph has
    one and the text fits unshortened (retrieval shortens differently: a long text is embedded elsewhere)."""

    logits: np.ndarray
    embedding: np.ndarray | None


class _Passes:
    """The last few texts' passes, and those in flight, by text (thread-safe)."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Future[Pass]] = OrderedDict()

    def get(self, text: str, run: Any) -> Pass:
        with self._lock:
            entry = self._entries.get(text)
            owner = entry is None
            if entry is None:
                entry = self._entries[text] = Future()
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)  # a dropped one in flight still completes for its waiters
            else:
                self._entries.move_to_end(text)
        if owner:
            try:
                entry.set_result(run(text))
            except BaseException as exc:
                with self._lock:
                    self._entries.pop(text, None)
                entry.set_exception(exc)
        return entry.result()


def _pool(compiled: Any, size: int) -> queue.SimpleQueue[Any]:
    """Infer requests to take one at a time (a request is not thread-safe; the compiled model runs `size` at once)."""
    pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for _ in range(size):
        pool.put(compiled.create_infer_request())
    return pool


def _split_pass_config() -> dict[str, Any]:
    """One stream whose passes use every core (at least LONG_PASS_THREADS, at most 4): the pass's latency is
    its own work, split; under load the passes queue rather than share the cores with each other."""
    threads = max(LONG_PASS_THREADS, min(4, os.cpu_count() or 1))
    return {**SAME_ON_EVERY_CPU, "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads}


class _InFlight:
    """How many passes run now: a pass that starts alone may take every core (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def enter(self) -> bool:
        """Counts a pass in; True if no other pass runs."""
        with self._lock:
            self._count += 1
            return self._count == 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1


class GuardModel:
    """Implements the detector surface the rails use (`score`, `score_many`, `thresholds`); thread-safe.

    `embedder` and `embedding` are accepted and ignored: this model reads the text itself."""

    kind = "finetuned"

    def __init__(self, directory: Path = GUARD_MODEL_DIR, threads: int = 0, streams: int = 0) -> None:
        """`streams` passes run at once (default: one per core, at most 4), each on `threads` threads (0: the
        cores divided among the streams). Before, one pass at a time: at 32 concurrent turns they queued."""
        from app.guard.base import DetectorThresholds
        from app.rag.openvino_embedder import opt_out_of_openvino_telemetry

        directory = Path(directory)
        self.meta: dict[str, Any] = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        verify_weights(directory, self.meta)
        self.thresholds = DetectorThresholds(**self.meta["thresholds"])
        self.calibration = Calibration(**{k: tuple(v) for k, v in self.meta["calibration"].items()})
        self.category_labels = list(CATEGORY_CODES)
        self.topic_labels = list(TOPIC_LABELS)
        self._tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
        opt_out_of_openvino_telemetry()
        import openvino as ov

        streams = streams or max(1, min(4, os.cpu_count() or 1))
        # Every stream runs the same kernels on its own thread(s): a text's scores do not depend on which one.
        config: dict[str, Any] = {**SAME_ON_EVERY_CPU, "NUM_STREAMS": streams}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads * streams
        core = ov.Core()
        graph = core.read_model(directory / IR_FILE)
        # Guards trained before the shared graph have one output, and no embedding to give.
        self.shares_embedding = len(graph.outputs) > 1
        self._requests = _pool(core.compile_model(graph, "CPU", config), streams)
        # A short text whose pass starts while no other runs (a quiet server, one customer) is split over every
        # core: on a 2-core AVX2 EPYC a one-thread pass took ~22 ms for 19 tokens, split ~12 ms. Which path a
        # text takes then depends on load, which a verdict must not: every path gives bit-identical scores
        # (each output's sum runs in the same order whatever the thread count: tested).
        self._solo = _pool(core.compile_model(graph, "CPU", _split_pass_config()), 1)
        self._in_flight = _InFlight()
        # Long texts run the guard branch alone, each pass split over several cores.
        if self.shares_embedding:
            graph.remove_result(graph.get_results()[1])
        self._long = _pool(core.compile_model(graph, "CPU", _split_pass_config()), 1)
        self._passes = _Passes()
        # A text's token ids, read once: `embedding` asks whether it is long, then its pass reads the same ids.
        self._ids = functools.lru_cache(maxsize=256)(self._encode)
        log.info("guard model loaded (%s, OpenVINO int8 weights, %d streams)", directory.name, streams)

    @classmethod
    def load(cls, path: Path | None = None, threads: int = 0, streams: int = 0) -> GuardModel:
        return cls(Path(path) if path is not None else GUARD_MODEL_DIR, threads=threads, streams=streams)

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw network outputs (len(texts), N_OUTPUTS). Every text runs alone, unpadded: in a padded batch its
        scores would move in the last float digits with its neighbours (measured up to 0.009 in a logit), and
        a verdict must not depend on what else the server is checking at the time."""
        out = np.zeros((len(texts), N_OUTPUTS), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self._passes.get(text, self._run).logits
        return out

    def embedding(self, text: str) -> np.ndarray | None:
        """The text's retrieval embedding from the shared pass (cached with its scores); None where this graph
        has none or the text is too long to be embedded the way retrieval embeds it."""
        if not self.shares_embedding or self.is_long(text):
            return None  # at once: the caller embeds it elsewhere while the guard pass runs
        return self._passes.get(text, self._run).embedding

    def is_long(self, text: str) -> bool:
        """True if `text` takes the long path: the guard branch alone, on several threads, no embedding."""
        return len(self._ids(text)) >= LONG_TOKENS

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(encode_ids(self._tokenizer, [text])[0])

    def _run(self, text: str) -> Pass:
        ids = list(self._ids(text))
        input_ids, mask = pad_batch([ids])
        embeds = self.shares_embedding and len(ids) < LONG_TOKENS
        alone = self._in_flight.enter()
        # Alone, the solo request is free: every pass that takes it counts in first.
        pool = (self._solo if alone else self._requests) if embeds else self._long
        request = pool.get()
        try:
            result = request.infer({"input_ids": input_ids, "attention_mask": mask})
        finally:
            pool.put(request)
            self._in_flight.leave()
        logits = np.asarray(result[0], dtype=np.float32)[0].copy()
        embedding = None
        if embeds:
            vector = np.asarray(result[1], dtype=np.float32)[0]
            embedding = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return Pass(logits, embedding)

    def score_many(self, texts: list[str], embedder: Any = None) -> list[DetectorScores]:
        from app.guard.base import DetectorScores

        started = time.perf_counter()
        probs = probabilities(self.logits(texts), self.calibration) if texts else {}
        per_item_ms = (time.perf_counter() - started) * 1000.0 / max(1, len(texts))
        results = []
        for i in range(len(texts)):
            topic_p = probs["topic"][i]
            results.append(
                DetectorScores(
                    unsafe=float(probs["unsafe"][i]),
                    categories={c: float(p) for c, p in zip(CATEGORY_CODES, probs["categories"][i], strict=True)},
                    attack=float(probs["attack"][i]),
                    off_topic=float(1.0 - topic_p[0]),
                    topic=TOPIC_LABELS[int(np.argmax(topic_p))],
                    latency_ms=per_item_ms,
                    topic_probs={t: float(p) for t, p in zip(TOPIC_LABELS, topic_p, strict=True)},
                )
            )
        return results

    def score(self, text: str, embedder: Any = None, embedding: np.ndarray | None = None) -> DetectorScores:
        return self.score_many([text])[0]


class SharedPassEmbedder:
    """Implements app.rag.base.Embedder for a turn's user message and query: each text the guard's shared
    pass can embed comes from it (the guard scores the same message from that pass, so the message is read
    once); the rest (over-long texts, a guard graph without the embedding branch) from `fallback`."""

    def __init__(self, guard: GuardModel, fallback: Any) -> None:
        self._guard = guard
        self._fallback = fallback
        self.dim: int = fallback.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        rest = []
        for row, text in enumerate(texts):
            vector = self._guard.embedding(text)
            if vector is None:
                rest.append(row)
            else:
                out[row] = vector
        if rest:
            out[rest] = self._fallback.embed([texts[row] for row in rest])
        return out
