"""Observability: Prometheus metrics, JSON logs with request ids, optional OpenTelemetry spans.

Wiring, all in app/main.py: `add_observability(app, settings)` adds the HTTP middleware and `GET /metrics`; the
app's lifespan calls `configure_observability(settings)` (JSON logging, tracing when asked) and, once the state is
built, `instrument_state(state)`, which wraps `state.store` and `state.llm` so store latency and LLM backend errors
are measured without their code knowing.
The pipeline reports each finished turn with `observe_turn(result)`.
"""

from __future__ import annotations

import logging
from typing import Any

from app.observability.context import current_request_id, request_id_headers
from app.observability.instrumented import InstrumentedChatBackend, InstrumentedSessionStore
from app.observability.metrics import (
    active_stream,
    observe_backend_error,
    observe_rail,
    observe_turn,
    stream_closed,
    stream_opened,
)

__all__ = [
    "InstrumentedChatBackend",
    "InstrumentedSessionStore",
    "active_stream",
    "current_request_id",
    "add_observability",
    "configure_observability",
    "instrument_state",
    "observe_backend_error",
    "observe_rail",
    "observe_turn",
    "request_id_headers",
    "stream_closed",
    "stream_opened",
]

log = logging.getLogger("guardchat")


def instrument_state(state: Any) -> None:
    """Wraps the state's session store and chat backend in their metric-recording wrappers (idempotent)."""
    if not isinstance(state.store, InstrumentedSessionStore):
        state.store = InstrumentedSessionStore(state.store)
    if not isinstance(state.llm, InstrumentedChatBackend):
        state.llm = InstrumentedChatBackend(state.llm)


def configure_observability(settings: Any) -> None:
    """JSON logs (or text) and OpenTelemetry tracing when asked. Called at the start of the app's lifespan: uvicorn
    applies its own logging config after the app object is created, and would undo ours."""
    if settings.log_format == "json":
        from app.observability.jsonlog import configure_json_logging

        configure_json_logging(settings.log_level)
    from app.observability.tracing import enable_tracing

    enable_tracing(settings.otel_enabled)


def add_observability(app: Any, settings: Any) -> None:
    """Adds the request-id/metrics middleware and `GET /metrics` (before the UI's mount at "/", which
    app/main.py adds last)."""
    from app.observability.middleware import ObservabilityMiddleware

    app.add_middleware(ObservabilityMiddleware)
    if settings.metrics_enabled:
        app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)


async def metrics_endpoint(request: Any) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    from starlette.responses import Response

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
