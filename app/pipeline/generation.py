"""Speculative generation: the LLM starts as soon as the prompt is ready; its deltas wait in a queue
until the consumer (after the input rails pass) reads them, and the whole thing is cancelled if the
turn is blocked or the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from app.llm.base import ChatBackend, GenerationOptions, Usage

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
        self._deltas = 0
        self._usage_seen = False

    @classmethod
    def start(
        cls, llm: ChatBackend, messages: list[dict[str, str]], options: GenerationOptions
    ) -> SpeculativeGeneration:
        gen = cls(llm, messages, options)
        gen._task = asyncio.create_task(gen._pump())
        return gen

    def _on_usage(self, usage: Usage) -> None:
        self._usage_seen = True
        self.prompt_tokens = usage.prompt_tokens or self.prompt_tokens
        self.completion_tokens = usage.completion_tokens

    async def _pump(self) -> None:
        stream = self._llm.stream(self._messages, self._options, on_usage=self._on_usage)
        try:
            async for delta in stream:
                self._deltas += 1
                self._queue.put_nowait(delta)
            if not self._usage_seen:
                self.completion_tokens = self._deltas  # the backend sent no usage: one delta ≈ one token
            self.finish_reason = "stop"
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

    @property
    def ended(self) -> bool:
        """The LLM has sent its whole answer (what is left is already queued)."""
        return self.finish_reason is not None

    async def deltas(self) -> AsyncIterator[str]:
        """The generated text in order. Deltas that queued up while the consumer was busy (an output check)
        come as one: the hold-back window then sees everything generated so far at once."""
        while True:
            item = await self._queue.get()
            parts: list[str] = []
            while isinstance(item, str):
                parts.append(item)
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if parts:
                yield "".join(parts)
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
