"""Shared pieces for the hardening tests: secured servers, a switchable TCP proxy, a Llama Guard stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from app.settings import Settings
from tests.fixtures.server import LiveServer, free_port

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
GUARD_MODEL = "meta-llama/Llama-Guard-3-8B"


def secured(settings: Settings, *keys: str, **updates: Any) -> Settings:
    """`settings` with chat keys and the test admin token (plus any other field updates)."""
    return settings.model_copy(
        update={"api_keys": [SecretStr(k) for k in keys], "admin_token": SecretStr(ADMIN_TOKEN), **updates}
    )


def secured_server(settings: Settings) -> LiveServer:
    """A LiveServer (create_app adds the security middleware and runs its startup in the lifespan)."""
    return LiveServer(settings)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    assert "Traceback" not in response.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


class SwitchableProxy:
    """A TCP proxy on loopback in front of a real backend. Modes:
    - "pass":   forward bytes both ways (the backend works)
    - "refuse": accept and close at once (the backend is down: connection reset / empty reply)
    - "hang":   accept and never answer (the backend is stuck)
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode: Literal["pass", "refuse", "hang"] = "pass"
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._open: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST
                continue
            self._open.append(client)
            if self.mode == "hang":
                continue
            threading.Thread(target=self._forward_pair, args=(client,), daemon=True).start()

    def _forward_pair(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._open.append(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def set_mode(self, mode: Literal["pass", "refuse", "hang"]) -> None:
        """Switches mode and drops every open connection, so pooled keep-alive connections see the change."""
        self.mode = mode
        opened, self._open = self._open, []
        for s in opened:
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._stopped = True
        self.set_mode("refuse")
        self._sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class LlamaGuardStandIn:
    """Llama Guard 3 needs a GPU: this local server speaks its OpenAI /v1/completions wire protocol
    (as vLLM / NIM / trtllm-serve serve it) and answers "safe" unless a text contains `unsafe_marker`."""

    def __init__(self, unsafe_marker: str = "UNSAFE-MARKER") -> None:
        self.requests = 0
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            self.requests += 1
            verdict = "unsafe\nS2" if unsafe_marker in str(body.get("prompt", "")) else "safe"
            return JSONResponse(
                {
                    "id": "cmpl-guard",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "text": verdict, "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
                }
            )

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": GUARD_MODEL, "object": "model"}]}

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LlamaGuardStandIn:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("Llama Guard stand-in did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def llama_guard() -> Iterator[LlamaGuardStandIn]:
    standin = LlamaGuardStandIn().start()
    yield standin
    standin.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def secured_live(
    base_settings: Settings, index_data_dir: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One keyed server (in-memory sessions) shared by the auth, limits and fuzz tests. It has its own copy
    of the index and an empty knowledge dir, so uploads here never touch other tests' data."""
    import shutil

    root = tmp_path_factory.mktemp("secured")
    data_dir = root / "data"
    shutil.copytree(index_data_dir, data_dir)
    (root / "knowledge").mkdir()
    settings = secured(
        base_settings,
        *CHAT_KEYS,
        data_dir=data_dir,
        knowledge_dir=root / "knowledge",
        rate_limit=f"{RATE_LIMIT_PER_MINUTE}/minute",
        llm_max_tokens=24,
        rag_context_tokens=300,  # the test LLM has 1024 tokens of context
    )
    with secured_server(settings) as server:
        yield server


CHAT_KEYS = ("key-alice", "key-bob", "key-ratelimit", "key-fuzz", "key-bad-input")
RATE_LIMIT_PER_MINUTE = 300
