"""OpenAICompatClient against the real embedded llama.cpp server (SmolLM2-135M)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import httpx
import pytest

from app.llm.base import GenerationOptions, LLMBadResponse, LLMUnavailable, Usage
from app.llm.client import OpenAICompatClient
from app.llm.embedded import EmbeddedLLMServer
from app.llm.llamacpp import LlamaCppClient
from tests.fixtures.llm import TEST_MODEL

QUESTION = [{"role": "user", "content": "Name three colors."}]


async def test_complete_returns_text_and_usage(embedded_llm_client: OpenAICompatClient) -> None:
    result = await embedded_llm_client.complete(QUESTION, GenerationOptions(max_tokens=24, temperature=0))
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens > 0
    assert 0 < result.usage.completion_tokens <= 24


async def test_max_tokens_is_honoured(embedded_llm_client: OpenAICompatClient) -> None:
    result = await embedded_llm_client.complete(
        [{"role": "user", "content": "Write a long story about a dragon."}], GenerationOptions(max_tokens=3)
    )
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 3


async def test_stream_yields_several_deltas_and_final_usage(embedded_llm_client: OpenAICompatClient) -> None:
    usages: list[Usage] = []
    deltas = [
        delta
        async for delta in embedded_llm_client.stream(
            QUESTION, GenerationOptions(max_tokens=24, temperature=0), on_usage=usages.append
        )
    ]
    assert len(deltas) >= 2
    assert "".join(deltas).strip()
    assert len(usages) == 1
    assert usages[0].prompt_tokens > 0
    assert len(deltas) <= usages[0].completion_tokens <= 24


async def test_stream_matches_complete_at_temperature_zero(embedded_llm_client: OpenAICompatClient) -> None:
    options = GenerationOptions(max_tokens=16, temperature=0)
    whole = await embedded_llm_client.complete(QUESTION, options)
    streamed = "".join([d async for d in embedded_llm_client.stream(QUESTION, options)])
    assert streamed == whole.text


@pytest.mark.parametrize("grammar, allowed", [('root ::= "safe" | "unsafe"', {"safe", "unsafe"})])
async def test_grammar_constrains_output(
    embedded_llm_client: OpenAICompatClient, grammar: str, allowed: set[str]
) -> None:
    messages = [{"role": "user", "content": "Is the message 'how do I bake bread?' safe or unsafe?"}]
    result = await embedded_llm_client.complete(messages, GenerationOptions(max_tokens=8, grammar=grammar))
    assert result.text in allowed


async def test_grammar_forces_an_exact_answer(embedded_llm_client: OpenAICompatClient) -> None:
    # A 135M model never says this unprompted; only the grammar can make it.
    grammar = 'root ::= "zebra-42 " [0-9] [0-9]'
    result = await embedded_llm_client.complete(QUESTION, GenerationOptions(max_tokens=24, grammar=grammar))
    assert result.text.startswith("zebra-42 ")
    assert len(result.text) == len("zebra-42 ") + 2 and result.text[-2:].isdigit()


async def test_stop_sequence_cuts_output(embedded_llm_client: OpenAICompatClient) -> None:
    grammar = 'root ::= "alpha beta gamma"'
    # Under a grammar the sampler may spell a word in several small tokens ("g", "am", ...): 12 tokens ran out at
    # "alpha beta gam" once (CI), before the stop string was complete. Room for the whole text, sampled greedily.
    result = await embedded_llm_client.complete(
        QUESTION, GenerationOptions(max_tokens=48, temperature=0, grammar=grammar, stop=["gamma"])
    )
    assert result.text.strip() == "alpha beta"


async def test_complete_prompt_uses_the_raw_prompt(embedded_llm_client: OpenAICompatClient) -> None:
    prompt = "The capital of France is"
    result = await embedded_llm_client.complete_prompt(prompt, GenerationOptions(max_tokens=6, temperature=0))
    assert result.text
    # A chat template would add dozens of tokens around the prompt; the raw prompt is a handful.
    assert 0 < result.usage.prompt_tokens < 12


async def test_health_ok_and_model_listed(embedded_llm_client: OpenAICompatClient) -> None:
    await embedded_llm_client.health()


async def test_bad_request_is_llm_bad_response(embedded_llm_client: OpenAICompatClient) -> None:
    with pytest.raises(LLMBadResponse):
        await embedded_llm_client.complete(QUESTION, GenerationOptions(max_tokens=4, grammar="root ::= ???"))


async def test_closed_server_is_unavailable(embedded_model_path: Path) -> None:
    server = EmbeddedLLMServer(embedded_model_path, model_name="smollm2-135m", ctx_size=256, threads=1, parallel=1)
    with server:
        url = server.base_url
        client = LlamaCppClient(url, "smollm2-135m", max_retries=1)
        await client.health()
    started = time.monotonic()
    with pytest.raises(LLMUnavailable):
        await client.health()
    assert time.monotonic() - started < 3
    await client.aclose()


async def _slots_processing(server: EmbeddedLLMServer) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        metrics = (await http.get(f"{server.root_url}/metrics")).text
    match = re.search(r"^llamacpp:requests_processing\s+([0-9.e+-]+)", metrics, re.M)
    assert match, metrics[:300]
    return float(match.group(1))


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_leaving_a_stream_stops_generation(
    embedded_llm_server: EmbeddedLLMServer, embedded_llm_client: OpenAICompatClient, how: str
) -> None:
    """The client went away (the turn's task is cancelled) or the answer was blocked (the stream is closed):
    the connection must close so llama.cpp frees the slot at once. Over httpx it stayed open and llama.cpp
    generated on to max_tokens."""
    # ignore_eos: ~8 s of generation if nobody stops it, so only the cancellation can end it within the wait.
    options = GenerationOptions(max_tokens=700, temperature=0.8, extra={"ignore_eos": True})
    stream = embedded_llm_client.stream([{"role": "user", "content": "Tell me a long story."}], options)
    if how == "cancel":
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 30)
        assert await _slots_processing(embedded_llm_server) == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    else:
        assert await anext(stream)
        assert await _slots_processing(embedded_llm_server) == 1
        await stream.aclose()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 3
    while await _slots_processing(embedded_llm_server) > 0:
        assert time.monotonic() < deadline, "llama.cpp kept generating after the stream was left"
        await asyncio.sleep(0.05)


async def test_back_to_back_streams_need_no_retry(embedded_llm_url: str) -> None:
    """llama.cpp closes the connection after each streamed answer; a pooled one was reused before its close
    was seen and the next stream failed (with max_retries=0) or waited for a retry."""
    client = LlamaCppClient(embedded_llm_url, TEST_MODEL, max_retries=0)
    try:
        for _ in range(4):
            deltas = [d async for d in client.stream(QUESTION, GenerationOptions(max_tokens=3, temperature=0))]
            assert deltas
    finally:
        await client.aclose()
