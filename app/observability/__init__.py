"""Observability: Prometheus metrics, JSON logs with request ids, optional OpenTelemetry spans.

Wiring (one call in app/main.py:create_app, after the routers): `install_observability(app, settings)`.
It adds the HTTP middleware and `GET /metrics`, and at startup (inside the app's lifespan, after the
state is built) configures JSON logging, enables tracing when asked, and wraps `state.store` and
`state.llm` so store latency and LLM backend errors are measured without their code knowing.
The pipeline reports each finished turn with `observe_turn(result)`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
    "install_observability",
    "instrument_state",
    "observe_backend_error",
    "observe_rail",
    "observe_turn",
    "request_id_headers",
    "stream_closed",
    "stream_opened",
]

log = logging.getLogger("guardchat")
_INSTALLED = "_guardchat_observability"


def instrument_state(state: Any) -> None:
    """Wraps the state's session store and chat backend in their metric-recording wrappers (idempotent)."""
    if not isinstance(state.store, InstrumentedSessionStore):
        state.store = InstrumentedSessionStore(state.store)
    if not isinstance(state.llm, InstrumentedChatBackend):
        state.llm = InstrumentedChatBackend(state.llm)


def install_observability(app: Any, settings: Any) -> None:
    """Adds the middleware, `/metrics` and the startup hook to a FastAPI app. Calling it twice is a no-op.

    Settings read (with defaults until they exist in app/settings.py): `log_format` ("json" | "text",
    default "json"), `log_level`, `metrics_enabled` (default True), `otel_enabled` (default False).
    """
    if getattr(app.state, _INSTALLED, False):
        return
    setattr(app.state, _INSTALLED, True)
    from app.observability.middleware import ObservabilityMiddleware

    app.add_middleware(ObservabilityMiddleware)
    if settings.metrics_enabled:
        app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
        # First in line, so a UI mounted at "/" cannot shadow it.
        app.router.routes.insert(0, app.router.routes.pop())

    inner_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(asgi_app: Any) -> AsyncIterator[Any]:
        # Logging is configured here, not at import: uvicorn applies its own logging config after the
        # app object is created, and would undo ours.
        if settings.log_format == "json":
            from app.observability.jsonlog import configure_json_logging

            configure_json_logging(settings.log_level)
        from app.observability.tracing import enable_tracing

        enable_tracing(settings.otel_enabled)
        async with inner_lifespan(asgi_app) as maybe_state:
            state = getattr(asgi_app.state, "guardchat", None)
            if state is not None:
                instrument_state(state)
            yield maybe_state

    app.router.lifespan_context = lifespan


async def metrics_endpoint(request: Any) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    from starlette.responses import Response

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
