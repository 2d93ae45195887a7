"""OpenAICompatClient against local servers speaking trtllm-serve's / NIM's wire, and misbehaving servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from app.llm.base import GenerationOptions, LLMBadResponse, LLMTimeout, LLMUnavailable, Usage
from app.llm.client import LoRAAdapter, OpenAICompatClient, parse_lora_adapters
from app.llm.trtllm import TrtLLMClient
from tests.llm import wire

MESSAGES = [{"role": "user", "content": "hello"}]
SECRET = "sk-test-4f9c2e81d7"


def test_parse_lora_adapters_names_paths_and_ids() -> None:
    adapters = parse_lora_adapters(["support=/adapters/support", "legal"])
    assert adapters == {
        "support": LoRAAdapter("support", "/adapters/support", 1),
        "legal": LoRAAdapter("legal", None, 2),
    }
    with pytest.raises(ValueError):
        parse_lora_adapters(["=/x"])


def test_trtllm_requires_adapter_paths() -> None:
    with pytest.raises(ValueError, match="legal"):
        TrtLLMClient("http://127.0.0.1:1/v1", "m", lora_adapters=["legal"])


async def test_trtllm_health_lora_request_headers() -> None:
    with wire.serve(wire.trtllm_routes("llama-3-8b")) as server:
        client = TrtLLMClient(
            server.base_url, "llama-3-8b", api_key=SECRET, lora_adapters=["support=/lora/support"]
        )
        try:
            await client.health()
            assert server.paths() == ["/health"]  # trtllm-serve's root /health, not /v1/models

            options = GenerationOptions(adapter="support", request_id="req-123", max_tokens=5, grammar="root ::= x")
            result = await client.complete(MESSAGES, options)
            assert result.text == "answer via support"
            assert result.usage == Usage(prompt_tokens=7, completion_tokens=3)
            sent = server.last("/v1/chat/completions")
            assert sent.body["lora_request"] == {"lora_name": "support", "lora_int_id": 1, "lora_path": "/lora/support"}
            assert sent.body["model"] == "llama-3-8b"
            assert sent.body["max_tokens"] == 5
            assert "grammar" not in sent.body  # llama.cpp-only field
            assert sent.headers["x-request-id"] == "req-123"
            assert sent.headers["authorization"] == f"Bearer {SECRET}"

            streamed = "".join([d async for d in client.stream(MESSAGES, GenerationOptions(adapter="support"))])
            assert streamed == "answer via support"
            assert server.last("/v1/chat/completions").body["stream_options"] == {"include_usage": True}

            base = await client.complete(MESSAGES)
            assert base.text == "answer via base"
            assert "lora_request" not in server.last("/v1/chat/completions").body
        finally:
            await client.aclose()


async def test_nim_adapter_goes_as_model() -> None:
    with wire.serve(wire.nim_routes(["meta/llama3-8b", "support-lora"])) as server:
        client = OpenAICompatClient(server.base_url, "meta/llama3-8b", lora_adapters=["support-lora"])
        try:
            await client.health()
            assert server.paths() == ["/v1/models"]
            assert (await client.complete(MESSAGES, GenerationOptions(adapter="support-lora"))).text == (
                "served by support-lora"
            )
            assert "lora_request" not in server.last("/v1/chat/completions").body
            assert (await client.complete(MESSAGES)).text == "served by meta/llama3-8b"
            with pytest.raises(ValueError):
                await client.complete(MESSAGES, GenerationOptions(adapter="not-allowed"))
        finally:
            await client.aclose()


async def test_unknown_model_404_is_bad_response_with_detail() -> None:
    with wire.serve(wire.nim_routes(["a"])) as server:
        client = OpenAICompatClient(server.base_url, "b")
        try:
            with pytest.raises(LLMBadResponse, match="does not exist"):
                await client.complete(MESSAGES)
        finally:
            await client.aclose()


async def test_unreachable_port_is_unavailable_quickly() -> None:
    client = OpenAICompatClient(f"http://127.0.0.1:{wire.free_port()}/v1", "m", max_retries=2)
    started = time.monotonic()
    try:
        with pytest.raises(LLMUnavailable):
            await client.complete(MESSAGES)
        with pytest.raises(LLMUnavailable):
            await client.health()
    finally:
        await client.aclose()
    assert time.monotonic() - started < 3


@pytest.fixture
def dropping_server() -> Iterator[tuple[str, list[int]]]:
    """Accepts TCP connections and closes them without a byte: a connection error, counted per attempt."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    accepted = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted[0] += 1
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", accepted
    stop.set()
    thread.join(timeout=2)
    listener.close()


@pytest.mark.parametrize("max_retries", [0, 2])
async def test_connection_errors_are_retried_a_bounded_number_of_times(
    dropping_server: tuple[str, list[int]], max_retries: int
) -> None:
    url, accepted = dropping_server
    client = OpenAICompatClient(url, "m", max_retries=max_retries)
    try:
        with pytest.raises(LLMUnavailable):
            await client.complete(MESSAGES)
    finally:
        await client.aclose()
    assert accepted[0] == max_retries + 1


async def test_slow_server_is_timeout() -> None:
    with wire.serve({("POST", "/v1/chat/completions"): wire.slow(3.0)}) as server:
        client = OpenAICompatClient(server.base_url, "m", timeout_s=0.5, max_retries=2)
        started = time.monotonic()
        try:
            with pytest.raises(LLMTimeout):
                await client.complete(MESSAGES)
        finally:
            await client.aclose()
        assert time.monotonic() - started < 2  # a timeout is not retried
        assert len(server.requests) == 1


async def test_stream_stalling_mid_way_is_timeout_and_not_retried() -> None:
    events = wire.sse(["one ", "two ", "three"], pings=False)

    async def stalling(request, body):
        return wire.stream_response(events, delay_after=2, delay_s=3.0)

    with wire.serve({("POST", "/v1/chat/completions"): stalling}) as server:
        client = OpenAICompatClient(server.base_url, "m", timeout_s=0.5)
        received: list[str] = []
        try:
            with pytest.raises(LLMTimeout):
                async for delta in client.stream(MESSAGES):
                    received.append(delta)
        finally:
            await client.aclose()
        assert received == ["one ", "two "]
        assert len(server.requests) == 1


async def test_stream_parsing_pings_usage_and_done() -> None:
    events = wire.sse(["Hel", "lo", "!"], pings=True)

    async def handler(request, body):
        return wire.stream_response(events)

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        client = OpenAICompatClient(server.base_url, "m")
        usages: list[Usage] = []
        try:
            deltas = [d async for d in client.stream(MESSAGES, on_usage=usages.append)]
        finally:
            await client.aclose()
    assert deltas == ["Hel", "lo", "!"]
    assert usages == [Usage(prompt_tokens=11, completion_tokens=3)]


async def test_finished_streams_return_their_connection_to_the_pool() -> None:
    """A stream read to [DONE] must leave its keep-alive connection reusable: closing it unread made every
    turn open a new TCP connection to the LLM (~0.7 ms each on loopback, more over a network)."""
    client_ports: list[int] = []

    async def handler(request, body):
        assert request.client is not None
        client_ports.append(request.client.port)
        return wire.stream_response(wire.sse(["a", "b"]))

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        client = OpenAICompatClient(server.base_url, "m")
        try:
            for _ in range(3):
                assert [d async for d in client.stream(MESSAGES)] == ["a", "b"]
        finally:
            await client.aclose()
    assert len(client_ports) == 3 and len(set(client_ports)) == 1, client_ports


@pytest.mark.parametrize(
    "events, error",
    [
        (wire.sse(["a"], finish=False, done=False), LLMUnavailable),  # connection closed before the end
        (['data: {"choices": [{"delta": {"content": "a"}}]}\n\n', "data: {not json\n\n"], LLMBadResponse),
        (['data: {"error": {"message": "context overflow", "code": 400}}\n\n'], LLMBadResponse),
        (["event: error\n", 'data: {"message": "boom"}\n\n'], LLMBadResponse),
        (['error: {"code": 500, "message": "slot crashed"}\n\n'], LLMBadResponse),
    ],
)
async def test_broken_streams_raise_typed_errors(events: list[str], error: type[Exception]) -> None:
    async def handler(request, body):
        return wire.stream_response(events)

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        client = OpenAICompatClient(server.base_url, "m")
        try:
            with pytest.raises(error):
                async for _ in client.stream(MESSAGES):
                    pass
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    "status, content, error",
    [
        (200, "<html>not json</html>", LLMBadResponse),
        (200, {"object": "chat.completion", "choices": []}, LLMBadResponse),
        (200, {"choices": [{"message": {"content": 42}}]}, LLMBadResponse),
        (400, {"error": {"message": "prompt too long", "type": "invalid_request_error"}}, LLMBadResponse),
        (422, {"detail": "field required"}, LLMBadResponse),
        (429, {"error": {"message": "too many requests"}}, LLMUnavailable),
        (500, "Internal Server Error", LLMUnavailable),
        (503, {"error": {"message": "loading model"}}, LLMUnavailable),
        (504, "gateway timeout", LLMTimeout),
    ],
)
async def test_junk_and_error_statuses(status: int, content: str | dict, error: type[Exception]) -> None:
    with wire.serve({("POST", "/v1/chat/completions"): wire.fixed(status, content)}) as server:
        client = OpenAICompatClient(server.base_url, "m", max_retries=2)
        try:
            with pytest.raises(error):
                await client.complete(MESSAGES)
        finally:
            await client.aclose()
        assert len(server.requests) == 1  # HTTP answers are never retried


async def test_error_messages_never_contain_the_api_key() -> None:
    async def echo_auth(request, body):
        message = f"invalid key {request.headers['authorization']}"
        return wire.JSONResponse({"error": {"message": message}}, status_code=401)

    routes = {
        ("POST", "/v1/chat/completions"): echo_auth,
        ("POST", "/v1/completions"): wire.fixed(400, f"bad {SECRET}"),
    }
    with wire.serve(routes) as server:
        client = OpenAICompatClient(server.base_url, "m", api_key=SECRET)
        try:
            with pytest.raises(LLMUnavailable) as auth_error:
                await client.complete(MESSAGES)
            with pytest.raises(LLMBadResponse) as bad_request:
                await client.complete_prompt("x")
        finally:
            await client.aclose()
    for exc in (auth_error.value, bad_request.value):
        assert SECRET not in str(exc)
        assert "***" in str(exc)


async def test_options_map_to_openai_fields() -> None:
    with wire.serve(wire.trtllm_routes("m")) as server:
        client = OpenAICompatClient(server.base_url, "m")
        options = GenerationOptions(
            max_tokens=9, temperature=0.3, top_p=0.8, stop=["\n\n"], grammar='root ::= "x"', extra={"seed": 7}
        )
        try:
            await client.complete(MESSAGES, options)
        finally:
            await client.aclose()
    body = server.last("/v1/chat/completions").body
    assert body == {
        "model": "m",
        "messages": MESSAGES,
        "max_tokens": 9,
        "temperature": 0.3,
        "top_p": 0.8,
        "stop": ["\n\n"],
        "seed": 7,
    }


def test_the_environment_proxy_is_resolved_once_like_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.llm.transport import env_proxy

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("http://gpu-host:8000/v1") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert env_proxy("http://gpu-host:8000/v1") == "http://proxy.internal:3128"
    assert env_proxy("http://127.0.0.1:8000/v1") is None  # NO_PROXY
    assert env_proxy("https://nim.example/v1") is None  # no HTTPS_PROXY set
