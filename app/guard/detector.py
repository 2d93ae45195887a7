"""Stage 1 of the safety cascade: small linear heads on the turn's MiniLM embedding.

Four heads share one feature vector (the 384-d normalised MiniLM embedding plus a few cheap
lexical features): `unsafe` (harmful request), `attack` (jailbreak / prompt injection /
system-prompt extraction), `topic` (bank support vs. advice we refuse vs. off-topic) and the
Llama Guard 3 categories S1-S14 (one-vs-rest, meaningful only when `unsafe` is high).

Inference is pure numpy: the weights were fitted by `training.train` (scikit-learn, train time
only) and are committed as app/guard/weights/detector.npz + detector.json.

MiniLM truncates at 256 word pieces, and jailbreak templates are often long with the payload at
the end, so long texts are scored on several windows (head, overlapping middle windows, tail)
and the max over windows is taken for `unsafe` and `attack`. The head window is the full text
(which MiniLM truncates), so the pipeline's one query embedding is reused for it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.guard.base import Classifier, DetectorScores, DetectorThresholds
from app.guard.llama_guard import DEFAULT_CATEGORIES
from app.rag.base import Embedder

# Llama Guard 3's hazard taxonomy, one definition shared with the prompt builder.
LLAMA_GUARD_CATEGORIES = DEFAULT_CATEGORIES
TOPIC_LABELS = ("on_domain", "investment_advice", "legal_advice", "tax_advice", "off_topic")
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_STEM = "detector"

# ~180 words stay under MiniLM's 256 word pieces for ordinary English.
WINDOW_WORDS = 180
WINDOW_STRIDE = 120
MAX_WINDOWS = 8

_ENCODED_BLOB = re.compile(r"(?:[A-Za-z0-9+/]{24,}={0,2})|(?:(?:0x)?[0-9a-fA-F]{24,})|(?:(?:[01]{8}\s){4,})")
LEXICAL_FEATURES = ("encoded_blob", "non_alpha_ratio")


def load_classifier(kind: Literal["finetuned", "linear"] = "finetuned", threads: int = 0) -> Classifier:
    """The shipped weights of the chosen classifier (nothing is fetched)."""
    if kind == "linear":
        return Detector.load()
    from app.guard.guard_model import GuardModel

    return GuardModel.load(threads=threads)


def text_windows(text: str) -> list[str]:
    """The texts to embed for `text`: the text itself (MiniLM keeps its head), plus for long texts
    overlapping ~WINDOW_WORDS-word windows up to and including the tail, at most MAX_WINDOWS in all."""
    words = text.split()
    if len(words) <= WINDOW_WORDS:
        return [text]
    last_start = len(words) - WINDOW_WORDS
    starts = list(range(WINDOW_STRIDE, last_start, WINDOW_STRIDE)) + [last_start]
    if len(starts) > MAX_WINDOWS - 1:  # keep the tail and spread the rest evenly
        picks = np.linspace(0, len(starts) - 1, MAX_WINDOWS - 1).round().astype(int)
        starts = [starts[i] for i in sorted(set(picks.tolist()))]
    return [text] + [" ".join(words[s : s + WINDOW_WORDS]) for s in starts]


def lexical_features(texts: list[str]) -> np.ndarray:
    """Cheap signals the embedding misses: encoded payloads (base64/hex/binary) and symbol-heavy obfuscation."""
    out = np.zeros((len(texts), len(LEXICAL_FEATURES)), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i, 0] = 1.0 if _ENCODED_BLOB.search(text) else 0.0
        stripped = re.sub(r"\s", "", text)
        if stripped:
            out[i, 1] = sum(1 for c in stripped if not c.isalpha()) / len(stripped)
    return out


def build_features(embeddings: np.ndarray, texts: list[str]) -> np.ndarray:
    return np.hstack([np.asarray(embeddings, dtype=np.float32), lexical_features(texts)])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Detector:
    """Loads the committed weights once; `score` costs a few matrix-vector products per window."""

    kind = "linear"

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.meta = meta
        self.thresholds = DetectorThresholds(**meta["thresholds"])
        self.category_labels: list[str] = list(meta["category_labels"])
        self.topic_labels: list[str] = list(meta["topic_labels"])
        if tuple(meta.get("lexical_features", ())) != LEXICAL_FEATURES:
            raise ValueError("detector weights were trained with different lexical features; retrain them")
        self._unsafe_w, self._unsafe_b = arrays["unsafe_w"], float(arrays["unsafe_b"].reshape(-1)[0])
        self._attack_w, self._attack_b = arrays["attack_w"], float(arrays["attack_b"].reshape(-1)[0])
        self._unsafe_cal = arrays["unsafe_cal"]  # Platt (a, b) fitted on cross-validated logits
        self._attack_cal = arrays["attack_cal"]
        self._topic_w, self._topic_b = arrays["topic_w"], arrays["topic_b"]
        self._cat_w, self._cat_b = arrays["cat_w"], arrays["cat_b"]
        self.dim = int(self._unsafe_w.shape[0]) - len(LEXICAL_FEATURES)

    @classmethod
    def load(cls, path: Path | None = None) -> Detector:
        """`path` is the weights directory (default: the committed app/guard/weights/)."""
        directory = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
        if directory.suffix in (".npz", ".json"):
            directory = directory.parent
        meta = json.loads((directory / f"{WEIGHTS_STEM}.json").read_text(encoding="utf-8"))
        with np.load(directory / f"{WEIGHTS_STEM}.npz") as npz:
            arrays = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
        return cls(arrays, meta)

    # --- scoring -----------------------------------------------------------------------------
    def _binary(self, x: np.ndarray, w: np.ndarray, b: float, cal: np.ndarray) -> np.ndarray:
        return _sigmoid(cal[0] * (x @ w + b) + cal[1])

    def score_features(self, x: np.ndarray) -> DetectorScores:
        """Scores one text given the feature rows of its windows (row 0 = the head/full text)."""
        unsafe_w = self._binary(x, self._unsafe_w, self._unsafe_b, self._unsafe_cal)
        attack_w = self._binary(x, self._attack_w, self._attack_b, self._attack_cal)
        worst = int(np.argmax(unsafe_w))
        cats = _sigmoid(x[worst] @ self._cat_w.T + self._cat_b)
        topic_p = _softmax(x[0] @ self._topic_w.T + self._topic_b)
        on_domain = topic_p[self.topic_labels.index("on_domain")]
        return DetectorScores(
            unsafe=float(unsafe_w.max()),
            categories={c: float(p) for c, p in zip(self.category_labels, cats, strict=True)},
            attack=float(attack_w.max()),
            off_topic=float(1.0 - on_domain),
            topic=self.topic_labels[int(np.argmax(topic_p))],
            latency_ms=0.0,
            windows=int(x.shape[0]),
            topic_probs={t: float(p) for t, p in zip(self.topic_labels, topic_p, strict=True)},
        )

    def score(self, text: str, embedder: Embedder, embedding: np.ndarray | None = None) -> DetectorScores:
        """`embedding` is the turn's precomputed MiniLM embedding of `text`; windows beyond the head
        of a long text are embedded here."""
        started = time.perf_counter()
        windows = text_windows(text)
        if embedding is not None:
            head = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
            rest = embedder.embed(windows[1:]) if len(windows) > 1 else np.zeros((0, head.shape[1]), np.float32)
            embs = np.vstack([head, rest])
        else:
            embs = embedder.embed(windows)
        scores = self.score_features(build_features(embs, windows).astype(np.float64))
        scores.latency_ms = (time.perf_counter() - started) * 1000.0
        return scores

    def score_many(self, texts: list[str], embedder: Embedder) -> list[DetectorScores]:
        """Batched: all windows of all texts go through the embedder in one call."""
        started = time.perf_counter()
        per_text = [text_windows(t) for t in texts]
        flat = [w for ws in per_text for w in ws]
        feats = build_features(embedder.embed(flat), flat).astype(np.float64) if flat else np.zeros((0, 0))
        results: list[DetectorScores] = []
        row = 0
        for ws in per_text:
            results.append(self.score_features(feats[row : row + len(ws)]))
            row += len(ws)
        per_item_ms = (time.perf_counter() - started) * 1000.0 / max(1, len(texts))
        for r in results:
            r.latency_ms = per_item_ms
        return results
