"""EmbeddedLLMServer lifecycle and build_chat_backend, with the real SmolLM2 model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.llm.base import GenerationOptions, LLMUnavailable
from app.llm.client import OpenAICompatClient
from app.llm.embedded import EmbeddedLLMServer
from app.llm.factory import build_chat_backend
from app.llm.llamacpp import LlamaCppClient
from app.llm.trtllm import TrtLLMClient
from app.settings import PROJECT_ROOT, Settings


def test_session_server_is_loopback_and_slots_have_full_context(embedded_llm_server: EmbeddedLLMServer) -> None:
    assert embedded_llm_server.base_url.startswith("http://127.0.0.1:")
    assert embedded_llm_server.base_url.endswith("/v1")
    slots = httpx.get(embedded_llm_server.root_url + "/slots", timeout=5).json()
    assert len(slots) == 2
    assert all(slot["n_ctx"] == 1024 for slot in slots)  # ctx_size is per slot


def test_missing_model_file(tmp_path: Path) -> None:
    server = EmbeddedLLMServer(tmp_path / "absent.gguf", model_name="x")
    with pytest.raises(FileNotFoundError):
        server.start()
    assert not server.running


def test_not_a_gguf_fails_to_start(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 100)
    with pytest.raises(RuntimeError, match="llama.cpp could not start"):
        EmbeddedLLMServer(junk, model_name="x").start()


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]  # pydantic-settings init kwarg


def test_remote_backend_without_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="GUARDCHAT_LLM_URL"):
        build_chat_backend(settings(llm_backend="trtllm", llm_url=None, llm_model="m"))


async def test_remote_backends_build_clients() -> None:
    client, server = build_chat_backend(
        settings(
            llm_backend="trtllm",
            llm_url="http://gpu-host:8000/v1/",
            llm_model="llama",
            llm_api_key="k",
            llm_max_retries=4,
            lora_adapters=["support=/lora/support"],
        )
    )
    assert server is None
    assert (type(client), client.base_url, client.root_url) == (
        TrtLLMClient,
        "http://gpu-host:8000/v1",
        "http://gpu-host:8000",
    )
    assert client.model_name == "llama" and client.max_retries == 4
    assert client.adapters["support"].path == "/lora/support"
    await client.aclose()
    with pytest.raises(ValueError, match="path"):
        build_chat_backend(settings(llm_backend="trtllm", llm_url="http://h/v1", llm_model="m", lora_adapters=["a"]))
    client, _ = build_chat_backend(
        settings(llm_backend="openai", llm_url="http://h/v1", llm_model="m", lora_adapters=["a"])
    )
    assert type(client) is OpenAICompatClient and list(client.adapters) == ["a"]
    await client.aclose()
    # A llama-server run by the user speaks our embedded wire: grammars reach it.
    client, server = build_chat_backend(settings(llm_backend="llamacpp", llm_url="http://h:8080/v1", llm_model="q"))
    assert server is None and type(client) is LlamaCppClient and client.base_url == "http://h:8080/v1"
    await client.aclose()


async def test_embedded_backend_end_to_end(embedded_model_path: Path) -> None:
    # data_dir = the repo's data/, whose models/ already holds the verified SmolLM2 (the session fixture made it).
    config = settings(
        llm_backend="embedded",
        embedded_model="smollm2-135m",
        data_dir=PROJECT_ROOT / "data",
        embedded_ctx=512,
        embedded_threads=1,
        embedded_parallel=1,
    )
    client, server = build_chat_backend(config)
    assert server is not None
    try:
        assert type(client) is LlamaCppClient and client.model_name == "smollm2-135m"
        await client.health()
        result = await client.complete([{"role": "user", "content": "Hi"}], GenerationOptions(max_tokens=4))
        assert result.usage.completion_tokens > 0
    finally:
        server.close()
    assert not server.running
    with pytest.raises(LLMUnavailable):
        await client.health()
    await client.aclose()
