"""SpeculativeGeneration against a local server speaking the OpenAI streaming wire."""

from __future__ import annotations

import asyncio

import pytest

from app.llm.base import GenerationOptions, LLMBadResponse
from app.llm.client import OpenAICompatClient
from app.pipeline.generation import SpeculativeGeneration
from tests.llm import wire

MESSAGES = [{"role": "user", "content": "hello"}]
PIECES = ["To ", "freeze ", "your ", "card, ", "open ", "Cards."]


async def _wait_until_ended(generation: SpeculativeGeneration) -> None:
    for _ in range(500):
        if generation.ended:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the generation did not end")


async def test_deltas_that_queued_up_come_as_one_and_the_end_is_known() -> None:
    async def handler(request, body):
        return wire.stream_response(wire.sse(PIECES))

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        client = OpenAICompatClient(server.base_url, "m")
        try:
            generation = SpeculativeGeneration.start(client, MESSAGES, GenerationOptions())
            assert not generation.ended
            await _wait_until_ended(generation)  # the consumer was busy: everything is queued
            assert [d async for d in generation.deltas()] == ["".join(PIECES)]
            assert generation.completion_tokens == len(PIECES)  # the server's usage
        finally:
            await client.aclose()


async def test_deltas_read_as_they_come_stay_in_order() -> None:
    async def handler(request, body):
        return wire.stream_response(wire.sse(PIECES), delay_after=4, delay_s=0.2)

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        client = OpenAICompatClient(server.base_url, "m")
        try:
            generation = SpeculativeGeneration.start(client, MESSAGES, GenerationOptions())
            received = [d async for d in generation.deltas()]
            assert "".join(received) == "".join(PIECES)
            assert len(received) >= 2  # the stall split them: text is not held until the end
        finally:
            await client.aclose()


async def test_an_error_after_some_text_comes_after_that_text() -> None:
    events = wire.sse(PIECES[:2], finish=False, done=False) + ['data: {"error": {"message": "boom"}}\n\n']

    async def handler(request, body):
        return wire.stream_response(events)

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        client = OpenAICompatClient(server.base_url, "m")
        try:
            generation = SpeculativeGeneration.start(client, MESSAGES, GenerationOptions())
            received: list[str] = []
            with pytest.raises(LLMBadResponse):
                async for delta in generation.deltas():
                    received.append(delta)
            assert "".join(received) == "".join(PIECES[:2])
            assert not generation.ended
        finally:
            await client.aclose()
