"""Micro-batching for the embedder: concurrent callers share one forward pass.

Under load many turns embed their query at the same moment, each in its own worker thread
(`asyncio.to_thread`). A MiniLM forward pass costs much less per text in a batch than alone (tokenizer,
Python and torch dispatch are paid once), and the model runs one pass at a time anyway. So:

- a caller that finds the model idle runs at once: no added latency at concurrency 1 (no timer);
- callers that arrive while a pass is running queue up, and the next pass takes all of them
  (up to `max_batch` texts) — batches form exactly when there is load.

`BatchingEmbedder` implements the `Embedder` protocol of app/rag/base.py and wraps any embedder.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from app.rag.base import Embedder


@dataclass(eq=False)
class _Request:
    texts: list[str]
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class BatchingEmbedder:
    """Thread-safe; one leader thread runs each pass while the others wait for their rows."""

    def __init__(self, inner: Embedder, *, max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.inner = inner
        self.dim = inner.dim
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._running = False
        # Counters for benchmarks and metrics: how much batching actually happened.
        self.passes = 0
        self.texts_embedded = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        request = _Request(list(texts))
        with self._cond:
            self._pending.append(request)
            while True:
                if request.done:
                    break
                if not self._running:
                    batch = self._take_batch()
                    self._running = True
                    self._cond.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cond.acquire()
                        self._running = False
                        self._cond.notify_all()
                    continue
                self._cond.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _take_batch(self) -> list[_Request]:
        """Oldest requests first, up to max_batch texts (always at least one request)."""
        batch: list[_Request] = []
        size = 0
        while self._pending and (not batch or size + len(self._pending[0].texts) <= self.max_batch):
            request = self._pending.pop(0)
            batch.append(request)
            size += len(request.texts)
        return batch

    def _run(self, batch: list[_Request]) -> None:
        flat = [text for request in batch for text in request.texts]
        try:
            vectors = np.asarray(self.inner.embed(flat), dtype=np.float32)
        except BaseException as exc:  # every caller of the failed pass gets the error, none hangs
            for request in batch:
                request.error, request.done = exc, True
            return
        self.passes += 1
        self.texts_embedded += len(flat)
        start = 0
        for request in batch:
            request.result = vectors[start : start + len(request.texts)]
            request.done = True
            start += len(request.texts)
