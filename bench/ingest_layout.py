"""How ingestion hands chunks to MiniLM: document order in calls of 64 (today's app/rag/ingest.py) vs
length-sorted batches. Same vectors, far less padding.

    .venv/bin/python -m bench.ingest_layout [torch_threads]     # default 2; the server runs torch at 1
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

from bench.ingest_speed import real_chunk_texts


def main() -> None:
    import torch

    from app.rag.embedder import get_embedder

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    texts = real_chunk_texts()
    embedder = get_embedder()
    embedder.embed(texts[:16])
    order = np.argsort([len(t) for t in texts])

    def run(label: str, fn: Callable[[], np.ndarray]) -> np.ndarray:
        best = float("inf")
        vectors = np.zeros(0)
        for _ in range(2):
            started = time.perf_counter()
            vectors = fn()
            best = min(best, time.perf_counter() - started)
        print(f"{label}: {len(texts) / best:.1f} chunks/s", flush=True)
        return vectors

    def sorted_calls(per_call: int, batch_size: int) -> np.ndarray:
        out = np.empty((len(texts), embedder.dim), np.float32)
        for start in range(0, len(texts), per_call):
            rows = order[start : start + per_call]
            out[rows] = embedder.embed([texts[i] for i in rows], batch_size=batch_size)
        return out

    reference = run("today: 64 texts per call in document order, batch 64",
                    lambda: np.vstack([embedder.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)]))
    for label, fn in (("length-sorted, 64 per call, batch 64", lambda: sorted_calls(64, 64)),
                      ("length-sorted, 64 per call, batch 16", lambda: sorted_calls(64, 16)),
                      ("one call, batch 16 (sentence-transformers sorts)", lambda: embedder.embed(texts, 16))):
        vectors = run(label, fn)
        print(f"  max |diff| vs today: {float(np.abs(vectors - reference).max()):.1e}")


if __name__ == "__main__":
    main()
