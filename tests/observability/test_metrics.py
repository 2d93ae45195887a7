"""/metrics after real turns through a real server (embedded SmolLM2, shipped rails and knowledge)."""

from __future__ import annotations

import inspect
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

import app.pipeline.turn
from app.guard.base import RailResult
from app.observability import observe_turn
from app.pipeline.turn import TurnResult
from tests.fixtures.server import LiveServer


def scrape(server: LiveServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def pipeline_reports_turns() -> bool:
    return "observe_turn" in inspect.getsource(app.pipeline.turn)


def test_http_store_and_stream_metrics(observed_server: LiveServer) -> None:
    before = scrape(observed_server)
    with observed_server.client() as client:
        sid = client.post("/api/sessions").json()["id"]
        r = client.post("/v1/chat/completions", headers={"X-Session-Id": sid},
                        json={"messages": [{"role": "user", "content": "How do I order a replacement debit card?"}]})
        assert r.status_code == 200, r.text
        assert client.get(f"/api/sessions/{sid}").status_code == 200
        streamed = {"stream": True, "messages": [{"role": "user", "content": "What is a wire fee?"}]}
        with client.stream("POST", "/v1/chat/completions", json=streamed) as s:
            assert s.status_code == 200
            during = scrape(observed_server)
            body = "".join(s.iter_text())
        assert "[DONE]" in body
    # A request is counted just after its last byte is sent: the scrape can briefly trail it.
    chat = {"route": "/v1/chat/completions", "method": "POST", "status": "200"}
    requests = "guardchat_http_requests_total"
    deadline = time.monotonic() + 5
    after = scrape(observed_server)
    while value(after, requests, **chat) - value(before, requests, **chat) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = scrape(observed_server)

    assert value(after, requests, **chat) - value(before, requests, **chat) == 2, after[requests]
    # The route TEMPLATE is the label, never the raw path with the session id in it.
    assert value(after, "guardchat_http_requests_total", route="/api/sessions/{session_id}", method="GET") >= 1
    assert not any(sid in lab.get("route", "") for lab, _ in after["guardchat_http_requests_total"])
    assert value(after, "guardchat_http_request_duration_seconds_count", route="/v1/chat/completions") >= 2
    # Store latency through the instrumented store: the session was created and read, and each chat turn
    # opened (lock + history) and committed (append + unlock) it.
    for op in ("create", "get", "history", "open_turn", "commit"):
        assert value(after, "guardchat_store_operation_duration_seconds_count", operation=op) > value(
            before, "guardchat_store_operation_duration_seconds_count", operation=op), op
    assert value(during, "guardchat_active_streams") >= 1
    assert value(after, "guardchat_active_streams") == 0


def test_turn_metrics_after_a_real_turn(observed_server: LiveServer) -> None:
    """Stage latencies, rail decisions and tokens. Through the pipeline's own `observe_turn` call when it is
    wired; otherwise `observe_turn` is fed the real turn's `guardchat` object and usage."""
    before = scrape(observed_server)
    with observed_server.client() as client:
        r = client.post("/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "How long does a domestic wire take?"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    extra = body["guardchat"]
    if not pipeline_reports_turns():
        observe_turn(TurnResult(
            answer=body["choices"][0]["message"]["content"], blocked=extra["blocked"], session_id=None,
            turn_id=extra["turn_id"], rails=[RailResult(**rail) for rail in extra["rails"]],
            timings_ms=extra["timings_ms"], prompt_tokens=body["usage"]["prompt_tokens"],
            completion_tokens=body["usage"]["completion_tokens"], status="blocked" if extra["blocked"] else "ok"))
    after = scrape(observed_server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for stage in extra["timings_ms"]:
        label = "time_to_first_token" if stage == "first_token" else stage
        assert delta("guardchat_stage_duration_seconds_count", stage=label) == 1, stage
    assert extra["rails"], "the shipped config has input rails"
    for rail in extra["rails"]:
        for category in rail["categories"] or ["none"]:
            assert delta("guardchat_rail_decisions_total", rail=rail["name"], verdict=rail["verdict"],
                         category=category) >= 1
    assert delta("guardchat_tokens_total", direction="in") == body["usage"]["prompt_tokens"] > 0
    assert delta("guardchat_tokens_total", direction="out") == body["usage"]["completion_tokens"]
    assert delta("guardchat_turns_total") == 1


def test_metrics_families_are_exposed(observed_server: LiveServer) -> None:
    text = httpx.get(observed_server.url + "/metrics", timeout=30).text
    names = {family.name: family.type for family in text_string_to_metric_families(text)}
    for family in ("guardchat_http_requests", "guardchat_http_request_duration_seconds",
                   "guardchat_stage_duration_seconds", "guardchat_rail_decisions", "guardchat_tokens",
                   "guardchat_backend_errors", "guardchat_store_operation_duration_seconds",
                   "guardchat_active_streams"):
        assert family in names, family
    assert names["guardchat_active_streams"] == "gauge"
    assert names["guardchat_stage_duration_seconds"] == "histogram"
