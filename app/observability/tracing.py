"""Optional OpenTelemetry tracing (the `[otel]` extra), off by default.

Enabled by the `otel_enabled` setting when `opentelemetry` is importable. We only use the API: the
deployment chooses the SDK, exporter and endpoint the usual way (OTEL_* variables read by the SDK,
or `opentelemetry-instrument`); with no SDK configured the API's no-op tracer makes all of this free.

Spans: one SERVER span per HTTP request (`HTTP <method> <route>`), and per chat turn a
`guardchat.turn` span carrying status, tokens and rail verdicts, with one child span per pipeline
stage reconstructed from the turn's timings (stages run partly concurrently, so child spans are laid
out from the turn start by their measured durations, not their exact start times).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.pipeline.turn_types import TurnResult

log = logging.getLogger(__name__)

_tracer: Any = None  # an opentelemetry Tracer once enabled


def enable_tracing(enabled: bool) -> bool:
    """Turns tracing on when asked and the API is installed. Returns whether it is on."""
    global _tracer
    if not enabled:
        _tracer = None
        return False
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning("otel_enabled is set but opentelemetry is not installed (pip install 'guardchat[otel]')")
        _tracer = None
        return False
    _tracer = trace.get_tracer("guardchat")
    return True


def tracing_enabled() -> bool:
    return _tracer is not None


@contextmanager
def request_span(scope: MutableMapping[str, Any]) -> Iterator[Any]:
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    method = scope.get("method", "GET")
    with _tracer.start_as_current_span(f"HTTP {method}", kind=SpanKind.SERVER) as span:
        span.set_attribute("http.request.method", method)
        try:
            yield span
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"HTTP {method} {route}")
                span.set_attribute("http.route", route)


def record_turn_span(result: TurnResult) -> None:
    if _tracer is None:
        return
    end_ns = time.time_ns()
    total_ms = result.timings_ms.get("total", 0.0)
    start_ns = end_ns - int(total_ms * 1e6)
    attributes = {
        "guardchat.turn_id": result.turn_id,
        "guardchat.status": result.status,
        "guardchat.blocked": result.blocked,
        "guardchat.prompt_tokens": result.prompt_tokens,
        "guardchat.completion_tokens": result.completion_tokens,
        "guardchat.rails_version": str(result.trace.get("rails_version", "")),
    }
    turn = _tracer.start_span("guardchat.turn", start_time=start_ns, attributes=attributes)
    from opentelemetry import trace

    ctx = trace.set_span_in_context(turn)
    for rail in result.rails:
        turn.add_event(
            f"rail {rail.name}",
            {"rail": rail.name, "verdict": rail.verdict, "categories": ",".join(rail.categories),
             "score": float(rail.score) if rail.score is not None else -1.0, "latency_ms": rail.latency_ms},
        )
    for stage, ms in result.timings_ms.items():
        if stage in ("total", "first_token"):
            continue
        child = _tracer.start_span(f"guardchat.{stage}", context=ctx, start_time=start_ns)
        child.end(end_time=start_ns + int(ms * 1e6))
    turn.end(end_time=end_ns)
