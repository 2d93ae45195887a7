"""Speculative generation: the LLM starts as soon as the prompt is ready; its deltas wait in a queue
until the consumer (after the input rails pass) reads them, and the whole thing is cancelled if the
turn is blocked or the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from app.llm.base import ChatBackend, GenerationOptions

_END = object()


class SpeculativeGeneration:
    def __init__(self, llm: ChatBackend, messages: list[dict[str, str]], options: GenerationOptions) -> None:
        self._llm = llm
        self._messages = messages
        self._options = options
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.finish_reason: str | None = None
        self.prompt_tokens = sum(len(m["content"]) for m in messages) // 4  # replaced by real usage when sent
        self.completion_tokens = 0

    @classmethod
    def start(cls, llm: ChatBackend, messages: list[dict[str, str]], options: GenerationOptions) -> SpeculativeGeneration:
        gen = cls(llm, messages, options)
        gen._task = asyncio.create_task(gen._pump())
        return gen

    async def _pump(self) -> None:
        stream = self._llm.stream(self._messages, self._options)
        try:
            async for delta in stream:
                self.completion_tokens += 1
                self._queue.put_nowait(delta)
            usage = getattr(stream, "usage", None) or getattr(self._llm, "last_usage", None)
            if usage is not None:
                self.prompt_tokens = getattr(usage, "prompt_tokens", self.prompt_tokens) or self.prompt_tokens
                self.completion_tokens = getattr(usage, "completion_tokens", 0) or self.completion_tokens
            self.finish_reason = getattr(stream, "finish_reason", None) or "stop"
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced to the consumer, in order
            self._queue.put_nowait(exc)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def deltas(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, str)
            yield item

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
