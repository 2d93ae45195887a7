"""Two real `guardchat serve` processes on one Redis: a conversation moves between them, the rate limit is
shared, a rails publish on one is served by the other within a second, and SIGTERM drains before exit.
Started once for the module (CI has 2 cores); the SIGTERM test runs last because it ends replica B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis

from tests.fixtures.redis import RedisProcess
from tests.fixtures.server import free_port
from tests.hardening.conftest import ADMIN_TOKEN, assert_openai_error, bearer

pytestmark = pytest.mark.slow

KEYS = ("key-replica-conv", "key-replica-rl", "key-replica-drain")
RATE_LIMIT = 6
SECRET_PROMPT = "my favourite colour is ultramarine-7f3a, how do I reset my password?"
GRACE_S = 20

# Runs the real `guardchat serve` command.
LAUNCHER = """
import sys
from app.cli import app as cli
cli(["serve", "--port", sys.argv[1]], prog_name="guardchat")
"""


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, headers=bearer(key) if key else {})

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"replica {self.name} not ready: {self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def redis_for_replicas() -> Iterator[RedisProcess]:
    with RedisProcess() as redis:
        yield redis


@pytest.fixture(scope="module")
def replicas(
    embedded_llm_url: str,
    index_data_dir: Path,
    redis_for_replicas: RedisProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Replica, Replica]]:
    logs = tmp_path_factory.mktemp("replica-logs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDCHAT_")}
    env.update(
        {
            "GUARDCHAT_LLM_BACKEND": "openai",
            "GUARDCHAT_LLM_URL": embedded_llm_url,
            "GUARDCHAT_LLM_MODEL": "smollm2-135m",
            "GUARDCHAT_LLM_MAX_TOKENS": "120",
            "GUARDCHAT_RAG_ENABLED": "false",  # short prompts: the test LLM has 1024 tokens of context
            "GUARDCHAT_DATA_DIR": str(index_data_dir),
            "GUARDCHAT_REDIS_URL": redis_for_replicas.url,
            "GUARDCHAT_API_KEYS": json.dumps(list(KEYS)),
            "GUARDCHAT_ADMIN_TOKEN": ADMIN_TOKEN,
            "GUARDCHAT_RATE_LIMIT": f"{RATE_LIMIT}/minute",
            "GUARDCHAT_SHUTDOWN_GRACE_S": str(GRACE_S),
            "GUARDCHAT_UI_ENABLED": "false",
            "GUARDCHAT_LOG_LEVEL": "info",
        }
    )
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            log = logs / f"replica-{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-c", LAUNCHER, str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            started.append(Replica(name, port, process, log))
        deadline = time.monotonic() + 240
        for replica in started:
            replica.wait_ready(deadline)
        yield started[0], started[1]
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.kill()
            replica.process.wait(timeout=30)


def test_conversation_continues_on_the_other_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    with a.client(KEYS[0]) as on_a, b.client(KEYS[0]) as on_b:
        sid = on_a.post("/api/sessions").json()["id"]
        first = on_a.post(
            "/v1/chat/completions",
            headers={"X-Session-Id": sid},
            json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 8},
        )
        assert first.status_code == 200, first.text
        second = on_b.post(
            "/v1/chat/completions",
            headers={"X-Session-Id": sid},
            json={"messages": [{"role": "user", "content": "And how do I change my PIN?"}], "max_tokens": 8},
        )
        assert second.status_code == 200, second.text
        turns = on_b.get(f"/api/sessions/{sid}").json()["turns"]
    assert [t["user"] for t in turns] == [SECRET_PROMPT, "And how do I change my PIN?"]
    assert turns[1]["metadata"]["trace"]["history_turns"] == 1  # B loaded A's turn into its prompt


def test_rate_limit_is_shared(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    codes: list[int] = []
    with a.client(KEYS[1]) as on_a, b.client(KEYS[1]) as on_b:
        for i in range(RATE_LIMIT + 2):
            response = (on_a if i % 2 == 0 else on_b).get("/v1/models")
            codes.append(response.status_code)
            if response.status_code == 429:
                assert_openai_error(response, 429, "rate_limit_exceeded")
                assert int(response.headers["retry-after"]) >= 1
    # Per-replica counters would have let all 8 through (4 on each, limit 6).
    assert codes == [200] * RATE_LIMIT + [429, 429]


def test_rails_publish_is_live_on_the_other_replica_within_a_second(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    admin = bearer(ADMIN_TOKEN)
    with a.client() as on_a, b.client() as on_b:
        live = on_a.get("/admin/api/rails", headers=admin).json()
        # Without the config's own test conversations: they judge the model (SmolLM2 here), not propagation.
        files = {path: text for path, text in live["files"].items() if not path.startswith("tests/")}
        files["config.yml"] = files["config.yml"].rstrip("\n") + f"\n# replica test {time.time()}\n"
        body = {"base_version": live["version"], "files": files, "message": "replica propagation test"}
        published = on_a.put("/admin/api/rails", headers=admin, json=body)
        assert published.status_code == 200, published.text
        new_version = published.json()["version"]
        published_at = time.monotonic()
        while True:
            status = on_b.get("/admin/api/rails/status", headers=admin).json()
            if status["serving_version"] == str(new_version):
                break
            assert time.monotonic() - published_at < 5, status
            time.sleep(0.02)
        elapsed = time.monotonic() - published_at
        assert on_b.get("/admin/api/rails", headers=admin).json()["files"]["config.yml"] == files["config.yml"]
        # The shipped config calls our own actions: NeMo's IORails cannot serve it, our compiled flows do.
        assert status["engine"] == "compiled", status
        assert "IORails" in status["engine_reason"] or "catalog" in status["engine_reason"], status
    assert elapsed <= 1.0, f"replica B served the new rails after {elapsed:.2f} s"


def test_sigterm_drains_in_flight_streams_then_exits(
    replicas: tuple[Replica, Replica], redis_for_replicas: RedisProcess
) -> None:
    a, b = replicas
    with a.client(KEYS[2]) as on_a:
        sid = on_a.post("/api/sessions").json()["id"]
    # Hold the session's turn lock (layout in app/sessions/redis.py) so the stream is certainly in flight
    # when SIGTERM arrives, however fast the test LLM is; letting go later lets the turn run and stream.
    redis = Redis.from_url(redis_for_replicas.url)
    lock_key = f"guardchat:session:{{{sid}}}:lock"
    assert redis.set(lock_key, "held-by-the-test", px=60_000, nx=True)
    body = {
        "messages": [{"role": "user", "content": "Explain step by step how to set up online banking."}],
        "max_tokens": 40,
        "stream": True,
    }
    events: list[str] = []
    stream_error: list[BaseException] = []

    def stream() -> None:
        try:
            with (
                b.client(KEYS[2]) as client,
                client.stream("POST", "/v1/chat/completions", headers={"X-Session-Id": sid}, json=body) as response,
            ):
                assert response.status_code == 200, response.read()
                events.extend(
                    line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
                )
        except BaseException as exc:  # reported to the test thread
            stream_error.append(exc)

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    time.sleep(1.0)  # the request is in flight, waiting for the session
    signalled_at = time.monotonic()
    b.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:
        with b.client(KEYS[2]) as client:
            assert_openai_error(client.get("/v1/models"), 503, "shutting_down")
            assert client.get("/readyz").status_code == 503
        assert b.process.poll() is None, "exited with a request in flight"
    finally:
        redis.delete(lock_key)
        redis.close()
    reader.join(GRACE_S + 10)
    assert not stream_error, stream_error
    assert events and events[-1] == "[DONE]", events[-3:]
    final = json.loads(events[-2])
    assert "error" not in final and final["choices"][0]["finish_reason"] in ("stop", "length"), final
    b.process.wait(timeout=GRACE_S + 15)
    assert time.monotonic() - signalled_at < GRACE_S + 15
    assert b.process.returncode in (0, -signal.SIGTERM)
    with a.client(KEYS[2]) as on_a:  # the drained turn was saved
        turns = on_a.get(f"/api/sessions/{sid}").json()["turns"]
    assert len(turns) == 1 and turns[0]["status"] in ("ok", "blocked")  # complete (the rails may refuse SmolLM2)


def test_logs_hold_no_secrets_or_prompts(replicas: tuple[Replica, Replica]) -> None:
    """Default log level (info), after real traffic on both replicas: no key, no token, no user prompt."""
    for replica in replicas:
        text = replica.log.read_text(errors="replace")
        assert "Uvicorn running" in text or "Application startup complete" in text  # the log was captured
        for secret in (*KEYS, ADMIN_TOKEN, "ultramarine-7f3a"):
            assert secret not in text, f"{secret!r} appears in replica {replica.name}'s log"
