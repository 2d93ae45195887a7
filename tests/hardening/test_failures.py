"""Failure behaviour against one real server whose dependencies the tests can break:
the LLM and the Llama Guard stand-in sit behind switchable TCP proxies, Redis is an own redis-server
that the tests kill and restart."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.llm.embedded import EmbeddedLLMServer
from app.settings import Settings
from tests.fixtures.redis import RedisProcess
from tests.fixtures.server import LiveServer
from tests.hardening.conftest import (
    GUARD_MODEL,
    LlamaGuardStandIn,
    SwitchableProxy,
    assert_openai_error,
    bearer,
    secured,
    secured_server,
)

KEY = bearer("key-failures")
QUESTION = "How do I reset my online banking password?"


@dataclass
class Rig:
    server: LiveServer
    redis: RedisProcess
    llm_proxy: SwitchableProxy
    guard_proxy: SwitchableProxy
    llm_root: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=60, headers=KEY)

    def new_session(self, client: httpx.Client) -> str:
        response = client.post("/api/sessions")
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


@pytest.fixture(scope="module")
def rig(
    base_settings: Settings, embedded_llm_server: EmbeddedLLMServer, llama_guard: LlamaGuardStandIn
) -> Iterator[Rig]:
    llm = urlsplit(embedded_llm_server.base_url)
    llm_proxy = SwitchableProxy(llm.hostname or "127.0.0.1", int(llm.port or 80))
    guard_proxy = SwitchableProxy("127.0.0.1", llama_guard.port)
    redis = RedisProcess(persistent=True)
    redis.start()
    settings = secured(
        base_settings,
        "key-failures",
        llm_url=llm_proxy.url,
        llm_timeout_s=10,  # a read timeout; generous because CI shares 2 cores
        llm_connect_timeout_s=2,
        llm_max_retries=0,
        llm_max_tokens=160,
        guard_backend="openai",
        guard_url=guard_proxy.url,
        guard_model=GUARD_MODEL,
        guard_timeout_s=3,
        rag_enabled=False,  # short prompts keep the turns fast; retrieval is not what fails here
        redis_url=redis.url,
        session_lock_ttl_s=3,
        session_lock_wait_s=20,
        rate_limit="1000/minute",  # exercises the limiter's fallback while Redis is down
        ui_enabled=False,
    )
    server = secured_server(settings).start()
    try:
        yield Rig(server, redis, llm_proxy, guard_proxy, embedded_llm_server.root_url)
    finally:
        server.stop()
        redis.cleanup()
        llm_proxy.close()
        guard_proxy.close()


def turn(client: httpx.Client, text: str = QUESTION, session: str | None = None, **extra: Any) -> httpx.Response:
    headers = {"X-Session-Id": session} if session else {}
    return client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra},
    )


def test_llm_down_503_slow_504_then_fine(rig: Rig) -> None:
    with rig.client() as client:
        try:
            rig.llm_proxy.set_mode("refuse")
            assert_openai_error(turn(client), 503)
            assert_openai_error(turn(client, stream=True), 503)
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "llm" in ready.json()["error"]["message"]
            rig.llm_proxy.set_mode("hang")
            started = time.monotonic()
            assert_openai_error(turn(client), 504)
            assert time.monotonic() - started < 30
        finally:
            rig.llm_proxy.set_mode("pass")
        assert turn(client).status_code == 200


def test_guard_backend_down_refuses_the_turn(rig: Rig) -> None:
    with rig.client() as client:
        try:
            rig.guard_proxy.set_mode("refuse")
            refused = turn(client)
            assert refused.status_code == 200, refused.text
            meta = refused.json()["guardchat"]
            assert meta["blocked"] is True
            assert any(r["verdict"] == "error" for r in meta["rails"])
            check = client.post("/v1/checks", json={"input": QUESTION})
            assert check.status_code == 200 and check.json()["allowed"] is False
        finally:
            rig.guard_proxy.set_mode("pass")
        allowed = turn(client)
        assert allowed.status_code == 200 and allowed.json()["guardchat"]["blocked"] is False


def test_output_checks_a_whole_short_answer_once_and_a_stream_window_by_window(
    rig: Rig, llama_guard: LlamaGuardStandIn
) -> None:
    """Nobody reads a non-streamed answer before it is whole: one output check for a short answer. A stream
    releases window by window, each checked first."""
    with rig.client() as client:
        before = llama_guard.requests
        plain = turn(client, max_tokens=60)
        assert plain.status_code == 200, plain.text
        answer = plain.json()["choices"][0]["message"]["content"]
        assert 40 < len(answer) <= 800 and not plain.json()["guardchat"]["blocked"], answer
        assert llama_guard.requests - before == 2  # the input check and one output check

        before = llama_guard.requests
        with client.stream(
            "POST", "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 60, "stream": True},
        ) as streamed:
            assert streamed.status_code == 200
            body = "".join(streamed.iter_text())
        assert "[DONE]" in body
        assert llama_guard.requests - before >= 3  # the input check and at least two windows


def test_redis_down_then_back(rig: Rig) -> None:
    with rig.client() as client:
        sid = rig.new_session(client)
        assert turn(client, session=sid).status_code == 200
        rig.redis.kill()
        try:
            assert_openai_error(turn(client, session=sid), 503, "store_unavailable")
            assert_openai_error(client.post("/api/sessions"), 503, "store_unavailable")
            assert turn(client).status_code == 200  # stateless turns need no store
            assert client.post("/v1/checks", json={"input": QUESTION}).status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "store" in ready.json()["error"]["message"]
        finally:
            rig.redis.start()
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:  # recovers by itself: nobody restarts the app
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.2)
        assert turn(client, session=sid).status_code == 200
        history = client.get(f"/api/sessions/{sid}").json()["turns"]
        assert len(history) == 2 and all(t["status"] == "ok" for t in history)


def _processing(llm_root: str) -> float:
    metrics = httpx.get(f"{llm_root}/metrics", timeout=5).text
    match = re.search(r"^llamacpp:requests_processing\s+([0-9.e+-]+)", metrics, re.M)
    assert match, metrics[:500]
    return float(match.group(1))


def test_client_disconnect_cancels_generation_and_saves_interrupted(rig: Rig) -> None:
    with rig.client() as client:
        sid = rig.new_session(client)
        body = {
            "messages": [{"role": "user", "content": "Explain step by step how to set up online banking, in detail."}],
            "max_tokens": 160,
            "stream": True,
        }
        seen = ""
        with client.stream("POST", "/v1/chat/completions", headers={"X-Session-Id": sid}, json=body) as response:
            assert response.status_code == 200
            # Held in a variable: breaking out of an unreferenced iter_lines() closes the response at once, and
            # the check below would then run after the client had already left.
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line.removeprefix("data: "))
                    assert "error" not in chunk, chunk
                    seen += chunk["choices"][0]["delta"].get("content") or ""
                    if seen:
                        break
            assert seen, "no content arrived before the stream ended"
            assert _processing(rig.llm_root) >= 1  # still generating when the client leaves
        # Leaving the `with` closes the connection mid-stream. llama.cpp notices at its next token; running on to
        # max_tokens (160) would take seconds.
        left = time.monotonic()
        while _processing(rig.llm_root) > 0:
            assert time.monotonic() - left < 1.5, "the LLM kept generating after the client left"
            time.sleep(0.05)
        deadline = time.monotonic() + 20
        turns: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            turns = client.get(f"/api/sessions/{sid}").json()["turns"]
            if turns:
                break
            time.sleep(0.2)
        assert len(turns) == 1, turns
        assert turns[0]["status"] == "interrupted"
        assert turns[0]["answer"].startswith(seen), "the text already shown to the user is kept"


@dataclass
class Outcome:
    text: str
    status: int
    code: str | None
    turn_id: str | None


def test_nothing_lost_when_redis_dies_under_load(rig: Rig) -> None:
    workers = 4
    with rig.client() as client:
        sessions = [rig.new_session(client) for _ in range(workers)]
    outcomes: dict[str, list[Outcome]] = {sid: [] for sid in sessions}
    stop = threading.Event()
    restarted = threading.Event()
    successes_after_restart: dict[str, int] = dict.fromkeys(sessions, 0)

    def worker(sid: str) -> None:
        with rig.client() as client:
            n = 0
            while not stop.is_set():
                n += 1
                text = f"{QUESTION} (request {sid[:6]}-{n})"
                try:
                    response = turn(client, text, session=sid)
                except httpx.HTTPError as exc:  # a transport error would be a finding: record it
                    outcomes[sid].append(Outcome(text, -1, type(exc).__name__, None))
                    continue
                ok = response.status_code == 200
                body = response.json()
                outcomes[sid].append(
                    Outcome(
                        text,
                        response.status_code,
                        None if ok else body["error"]["code"],
                        body["guardchat"]["turn_id"] if ok else None,
                    )
                )
                if ok and restarted.is_set():
                    successes_after_restart[sid] += 1
                if not ok:
                    time.sleep(0.1)

    threads = [threading.Thread(target=worker, args=(sid,), daemon=True) for sid in sessions]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    while sum(o.status == 200 for outs in outcomes.values() for o in outs) < workers:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rig.redis.kill()  # SIGKILL mid-load: turns are between lock, load, generate and save
    time.sleep(2.0)
    rig.redis.start()
    restarted.set()
    while min(successes_after_restart.values()) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert min(successes_after_restart.values()) >= 1, "sessions did not recover after Redis came back"

    failed = [o for outs in outcomes.values() for o in outs if o.status != 200]
    assert failed, "the outage did not hit any request; the test proved nothing"
    for o in failed:
        # 503 while Redis is down; 409 when a turn queued behind a lock holder that the crash orphaned
        # gave up waiting. Both are clean, retryable refusals that must leave no trace (checked below).
        assert (o.status, o.code) in ((503, "store_unavailable"), (409, "session_busy")), o

    with rig.client() as client:
        for sid in sessions:
            history = client.get(f"/api/sessions/{sid}").json()["turns"]
            ids = [t["id"] for t in history]
            texts = [t["user"] for t in history]
            assert len(ids) == len(set(ids)) and len(texts) == len(set(texts)), "a turn was stored twice"
            for stored in history:  # every stored turn is complete
                assert stored["user"] and stored["answer"] and stored["status"] in ("ok", "blocked")
                assert stored["metadata"]["turn_id"] == stored["id"]
                assert stored["metadata"]["session_id"] == sid
            by_text = dict(zip(texts, ids, strict=True))
            for o in outcomes[sid]:
                if o.status == 200:
                    assert by_text.get(o.text) == o.turn_id, f"acknowledged turn lost: {o}"
                else:
                    assert o.text not in by_text, f"a failed request left a trace: {o}"
            # Stored in the order they were acknowledged.
            acknowledged = [o.text for o in outcomes[sid] if o.status == 200]
            assert texts == acknowledged
