"""Optional OpenTelemetry tracing: off by default; when enabled, a request span per HTTP request and a turn
span with one child per pipeline stage (run only when the opentelemetry SDK is installed)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from app.observability import observe_turn
from app.observability.tracing import enable_tracing, tracing_enabled
from app.pipeline.turn import TurnResult
from tests.fixtures.server import LiveServer

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk not installed (extra [otel])")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):  # set once per process (the API forbids replacing it)
        provider = sdk.TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    enable_tracing(True)
    yield _EXPORTER
    enable_tracing(False)


def test_tracing_is_off_by_default() -> None:
    enable_tracing(False)
    assert not tracing_enabled()


def test_turn_span_with_stage_children(spans: InMemorySpanExporter) -> None:
    result = TurnResult(answer="ok", blocked=False, session_id=None, turn_id="t1",
                        timings_ms={"embed": 5.0, "input_rails": 12.0, "generate": 40.0, "total": 60.0},
                        prompt_tokens=10, completion_tokens=3)
    observe_turn(result)
    finished = {s.name: s for s in spans.get_finished_spans()}
    turn = finished["guardchat.turn"]
    assert turn.attributes["guardchat.prompt_tokens"] == 10
    for stage, ms in (("embed", 5.0), ("input_rails", 12.0), ("generate", 40.0)):
        child = finished[f"guardchat.{stage}"]
        assert child.parent is not None and child.parent.span_id == turn.context.span_id
        assert abs((child.end_time - child.start_time) / 1e6 - ms) < 0.01
    assert abs((turn.end_time - turn.start_time) / 1e6 - 60.0) < 0.01


def test_request_span_names_the_route(observed_server: LiveServer, spans: InMemorySpanExporter) -> None:
    httpx.get(observed_server.url + "/v1/models", timeout=30)
    deadline = time.monotonic() + 5  # the span ends just after the last byte is sent
    while "HTTP GET /v1/models" not in [s.name for s in spans.get_finished_spans()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "HTTP GET /v1/models" in [s.name for s in spans.get_finished_spans()]
