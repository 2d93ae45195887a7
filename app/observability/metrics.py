"""The Prometheus metric families and the functions that record into them.

All families live in prometheus-client's default registry (so process/GC collectors come along) and
are created once at import. Label values are always from small closed sets (route templates, stage
names, rail names, verdicts, category codes, error kinds): never a raw path, a session id or text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from app.pipeline.turn_types import TurnResult

# Buckets from 1 ms to 2 min: a classifier check is milliseconds, a CPU generation can take a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter(
    "guardchat_http_requests", "HTTP requests by route template, method and status.", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "guardchat_http_request_duration_seconds",
    "HTTP request latency (for streams: until the last byte) by route template and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "guardchat_stage_duration_seconds",
    "Latency of each pipeline stage of a chat turn (load_session, embed, input_rails, retrieve, generate, ...).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
TURNS = Counter("guardchat_turns", "Finished chat turns by status (ok, blocked, interrupted).", ["status"])
RAIL_DECISIONS = Counter(
    "guardchat_rail_decisions",
    "Rail decisions by rail, verdict and category ('none' when the rail named no category).",
    ["rail", "verdict", "category"],
)
RAIL_LATENCY = Histogram(
    "guardchat_rail_duration_seconds", "Latency of each rail check.", ["rail"], buckets=LATENCY_BUCKETS
)
TOKENS = Counter(
    "guardchat_tokens", "LLM tokens of chat turns: direction=in (prompt) or out (completion).", ["direction"]
)
BACKEND_ERRORS = Counter(
    "guardchat_backend_errors",
    "Backend failures by kind (llm_unavailable, llm_timeout, llm_bad_response, guard_error, store_unavailable, ...).",
    ["kind"],
)
STORE_LATENCY = Histogram(
    "guardchat_store_operation_duration_seconds",
    "Session store latency by operation (create, get, history, append, ...).",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
ACTIVE_STREAMS = Gauge("guardchat_active_streams", "Server-sent-event streams currently open.")


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_LATENCY.labels(route, method).observe(seconds)


def observe_rail(name: str, verdict: str, categories: list[str] | None, latency_ms: float | None) -> None:
    for category in categories or ["none"]:
        RAIL_DECISIONS.labels(name, verdict, category).inc()
    if latency_ms:
        RAIL_LATENCY.labels(name).observe(latency_ms / 1000)
    if verdict == "error":
        BACKEND_ERRORS.labels("guard_error").inc()


def observe_turn(result: TurnResult) -> None:
    """Records one finished turn: stage latencies, rail decisions, tokens in/out and the turn status.
    The pipeline calls it once per turn (TurnRunner.events, on the final Done event)."""
    for stage, ms in result.timings_ms.items():
        if stage == "first_token":  # a point in time from the turn start, not a stage duration: still useful
            STAGE_LATENCY.labels("time_to_first_token").observe(ms / 1000)
        else:
            STAGE_LATENCY.labels(stage).observe(ms / 1000)
    for rail in result.rails:
        observe_rail(rail.name, rail.verdict, rail.categories, rail.latency_ms)
    if result.prompt_tokens:
        TOKENS.labels("in").inc(result.prompt_tokens)
    if result.completion_tokens:
        TOKENS.labels("out").inc(result.completion_tokens)
    TURNS.labels(result.status).inc()
    from app.observability.tracing import record_turn_span

    record_turn_span(result)


def observe_backend_error(kind: str) -> None:
    """Counts one backend failure. `kind` is a short code from a closed set (e.g. LLMError.code)."""
    BACKEND_ERRORS.labels(kind).inc()


def stream_opened() -> None:
    ACTIVE_STREAMS.inc()


def stream_closed() -> None:
    ACTIVE_STREAMS.dec()


@contextmanager
def active_stream() -> Iterator[None]:
    """`with active_stream(): ...` around code that serves a stream (the HTTP middleware does this for SSE)."""
    stream_opened()
    try:
        yield
    finally:
        stream_closed()


@contextmanager
def timed_store_operation(operation: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:
        from app.sessions.base import StoreUnavailable

        if isinstance(exc, StoreUnavailable):
            observe_backend_error("store_unavailable")
        raise
    finally:
        STORE_LATENCY.labels(operation).observe(time.perf_counter() - start)


