"""Is a message about the conversation itself? The nearest labelled examples, on the vector the turn already has.

The phrases of app/pipeline/conversation.py recognise the usual wordings ("can you say that again?"); customers
also write "bullet it out", "recap pls", "ok im lost", which no phrase list keeps up with. Here a message counts
as about the conversation when its K nearest examples about the conversation are, on average, closer than its K
nearest examples of everything else (bank questions that borrow the same words — "can I get my statements in
Spanish" —, short bank follow-ups, greetings, off-topic requests) by more than MARGIN.

The examples (app/pipeline/data/conversation_examples.jsonl) were written by authors who never saw the
measuring set (tests/data/conversation_intent.jsonl). Their vectors ship beside them
(conversation_examples.npz, all-MiniLM-L6-v2 fp32, stored fp16): no start-up cost, no model call. The file
records the examples' sha256; a test fails when the examples change and the vectors were not rewritten:

    python -m app.pipeline.conversation_intent     # rewrites conversation_examples.npz
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
EXAMPLES = DATA_DIR / "conversation_examples.jsonl"
VECTORS = DATA_DIR / "conversation_examples.npz"
K = 3
# Measured on the independent set (docs/rag.md): 0.05 keeps the bank messages taken at the phrases' rate.
MARGIN = 0.05


def examples_sha256(path: Path = EXAMPLES) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_examples(path: Path = EXAMPLES) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class ConversationIntent:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    about: np.ndarray  # (n,) bool: the example is about the conversation

    def margin(self, vector: np.ndarray) -> float:
        """Mean similarity of the K nearest examples about the conversation minus that of the K nearest others."""
        sims = self.vectors @ np.asarray(vector, dtype=np.float32)
        nearest_about = np.sort(sims[self.about])[-K:].mean()
        nearest_other = np.sort(sims[~self.about])[-K:].mean()
        return float(nearest_about - nearest_other)

    def is_about_conversation(self, vector: np.ndarray) -> bool:
        return self.margin(vector) > MARGIN


@cache
def shipped_intent(dim: int) -> ConversationIntent | None:
    """The shipped examples, or None when the turn's vectors are of another size (another embedding model) or the
    vectors are missing: the phrases alone decide then."""
    if not VECTORS.exists():
        return None
    with np.load(VECTORS) as npz:
        vectors, about = npz["vectors"].astype(np.float32), npz["about"].astype(bool)
    if vectors.shape[1] != dim:
        return None
    return ConversationIntent(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), about)


def write_vectors(path: Path = VECTORS) -> Path:
    """Embeds the examples with all-MiniLM-L6-v2 (fp32) and writes them with the examples' sha256."""
    from app.rag.embedder import MiniLMEmbedder

    rows = read_examples()
    vectors = MiniLMEmbedder(precision="float32").embed([str(r["text"]) for r in rows])
    about = np.array([bool(r["about_conversation"]) for r in rows])
    np.savez_compressed(path, vectors=vectors.astype(np.float16), about=about, sha256=np.array(examples_sha256()))
    return path


if __name__ == "__main__":
    print(write_vectors())
