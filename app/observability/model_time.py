"""Model time of a turn: the wall-clock spans in which it waited on a model, so that what the pipeline itself
adds (HTTP, sessions, rails, retrieval, prompt, streaming) can be reported apart from it.

A turn calls `begin()`; from then on, in its task and the tasks it starts (they copy the context), every
backend request (the chat LLM, Llama Guard: app/llm/client.py) and the turn's query embedding record their
span. `covered_ms` merges overlapping spans, so work that runs side by side (the Llama Guard input check
beside the query embedding) counts once. Outside a turn, recording does nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

Spans = list[tuple[float, float]]  # (start, end) in time.perf_counter() seconds

_current: ContextVar[Spans | None] = ContextVar("guardchat_model_spans", default=None)


def begin() -> Spans:
    """Starts collecting for the current turn; returns the list the spans go into."""
    spans: Spans = []
    _current.set(spans)
    return spans


def record(start: float, end: float | None = None) -> None:
    spans = _current.get()
    if spans is not None:
        spans.append((start, time.perf_counter() if end is None else end))


@contextlib.contextmanager
def span() -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        record(start)


def covered_ms(spans: Spans, since: float, until: float) -> float:
    """Milliseconds of [since, until] covered by at least one span."""
    total = 0.0
    reach = since
    for start, end in sorted(spans):
        start, end = max(start, reach), min(end, until)
        if end > start:
            total += end - start
            reach = end
    return total * 1000
