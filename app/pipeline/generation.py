"""Speculative generation: the LLM starts as soon as the prompt is ready; its deltas wait in a queue
until the consumer (after the input rails pass) reads them, and the whole thing is cancelled if the
turn is blocked or the client goes away.

With a second-look plan (app/rag/second_look.py) the request stops at the "I don't know" text's second sentence and
the answer is watched while it could still be that text: it is held here, before any output rail or the customer
sees it. When it is the "I don't know" and a passage covers the question, a second request (the same messages, that
answer and a short follow-up) streams in its place. The first one ended normally (at its stop), so llama.cpp keeps
the exchange in that slot's KV cache and the second reads only the new turns. Otherwise the held text goes on: an
answer as it was, the "I don't know" as the configured text in full."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from app.llm.base import ChatBackend, GenerationOptions, LLMBadResponse, Usage

if TYPE_CHECKING:
    from app.rag.base import Chunk
    from app.rag.second_look import Plan

log = logging.getLogger(__name__)
_END = object()
TRAILING_CHARS = 80  # a first answer that goes on after the "I don't know" text is cut this far past it


def second_look_plan(
    state: Any,
    question: str,
    history: list[dict[str, str]],
    messages: list[dict[str, str]],
    sources: list[Chunk],
    idk: str,
) -> Plan | None:
    """The turn's second-look plan (None when it is switched off, or the prompt holds no sources)."""
    from app.pipeline.context import bm25_idf  # the weights passage selection used for this prompt
    from app.rag.second_look import make_plan

    return make_plan(
        state.settings, idk=idk, question=question, history=history, messages=messages, sources=sources,
        idf=bm25_idf(state), prefill_ok=continues_assistant(state.llm),
    )  # fmt: skip


def continues_assistant(llm: ChatBackend) -> bool:
    """The backend continues a final assistant message instead of answering after it: llama.cpp (the embedded server,
    or a llama-server: `GUARDCHAT_LLM_BACKEND=llamacpp`) does; OpenAI-style servers differ (vLLM needs a flag)."""
    return llm.continues_assistant


_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n\n")
FIRST_SENTENCE_CHARS = 400  # a second look's first "sentence" is checked by this many characters at most


def first_sentence_done(text: str) -> bool:
    """`text` holds a whole first sentence (a list or a long sentence: its first FIRST_SENTENCE_CHARS)."""
    return len(text) >= FIRST_SENTENCE_CHARS or _SENTENCE_END.search(text.lstrip()) is not None


class SpeculativeGeneration:
    def __init__(
        self,
        llm: ChatBackend,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        second_look: Plan | None = None,
    ) -> None:
        self._llm = llm
        self._messages = messages
        self._options = options
        self.second_look = second_look
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.finish_reason: str | None = None
        self.prompt_tokens = sum(len(m["content"]) for m in messages) // 4  # replaced by real usage when sent
        self.completion_tokens = 0
        self._earlier_tokens = 0  # completion tokens of the turn's first request, when a second look followed it
        self._deltas = 0
        self._earlier_deltas = 0  # deltas of that first request
        self._queued = 0
        self._usage_seen = False

    @classmethod
    def start(
        cls,
        llm: ChatBackend,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        second_look: Plan | None = None,
    ) -> SpeculativeGeneration:
        gen = cls(llm, messages, options, second_look)
        gen._task = asyncio.create_task(gen._pump())
        return gen

    def _on_usage(self, usage: Usage) -> None:
        self._usage_seen = True
        self.prompt_tokens = usage.prompt_tokens or self.prompt_tokens
        self.completion_tokens = self._earlier_tokens + usage.completion_tokens

    def _put(self, text: str) -> None:
        if text:
            self._queued += 1
            self._queue.put_nowait(text)

    async def _pump(self) -> None:
        try:
            look = self.second_look
            first, look_again = await self._relay(self._messages, look)
            if look_again and look is not None:
                await self._look_again(look, first)
            if not self._usage_seen:  # the (last) request sent no usage, or was stopped early: one delta ≈ one token
                self.completion_tokens = self._earlier_tokens + self._deltas - self._earlier_deltas
            self.finish_reason = "stop"
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced to the consumer, in order
            self._queue.put_nowait(exc)

    def _options_for(self, look: Plan | None) -> GenerationOptions:
        stop = look.stop() if look is not None else None
        if stop is None:
            return self._options
        return replace(self._options, stop=[*(self._options.stop or []), stop])

    @contextlib.asynccontextmanager
    async def _request(self, messages: list[dict[str, str]], look: Plan | None) -> AsyncIterator[AsyncIterator[str]]:
        """One streamed request, closed on the way out: leaving early stops it at the backend."""
        stream = self._llm.stream(messages, self._options_for(look), on_usage=self._on_usage)
        try:
            yield stream
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _relay(self, messages: list[dict[str, str]], look: Plan | None) -> tuple[str, bool]:
        """Streams one request into the queue; returns its text and whether it is an "I don't know" to look at again
        (then none of it was queued). With `look`, text that may still be the "I don't know" text is held: an answer
        that turns out to be something else goes on as it was; the "I don't know" itself, when it gets no second
        look, is queued as the configured text in full (its request stopped at the second sentence)."""
        text = ""
        held = look is not None  # text is held, not queued, while this is true
        look_again = False
        async with self._request(messages, look) as stream:
            async for delta in stream:
                self._deltas += 1
                text += delta
                if not held:
                    self._put(delta)
                    continue
                assert look is not None
                state = look.state(text)
                if state == "maybe" or (state == "idk" and look.within_idk(text)):
                    if state == "idk" and not look_again:
                        look_again = look.worth_it()  # decided once, as soon as it is the "I don't know"
                    continue
                if look_again:
                    if len(text) > len(look.idk) + TRAILING_CHARS:
                        break  # it goes on after the "I don't know": enough read, it is not shown anyway
                    continue
                if look.vets_first_answer() and not first_sentence_done(text):
                    continue  # an answer to a question with words no passage holds: its first sentence is vetted
                held = False  # an answer after all, or one that goes on differently: shown as it is (or vetted)
                if not self._first_answer_passes(look, text):
                    return text, False
                self._put(text)
        if held and not look_again:
            assert look is not None
            state = look.state(text)
            if state == "idk":
                self._put(look.idk)
            elif state == "maybe" or self._first_answer_passes(look, text):
                self._put(text)  # it ended at "I" (that as it is), or a whole answer of one sentence
        return text, look_again

    def _first_answer_passes(self, look: Plan, text: str) -> bool:
        """A first answer (not the "I don't know") that repeats the question's words no passage holds is replaced by
        the "I don't know" text (`Plan.vet_first`)."""
        if not look.vets_first_answer() or look.vet_first(text):
            return True
        self._put(look.idk)
        return False

    async def _look_again(self, look: Plan, first: str) -> None:
        """The second request, streamed in place of the first answer; on an error before it said anything, the
        first answer stands."""
        self._earlier_tokens = self.completion_tokens if self._usage_seen else self._deltas
        self._earlier_deltas, self._usage_seen = self._deltas, False  # the second request's usage, if it comes
        queued = self._queued
        started = time.perf_counter()
        try:
            await self._relay_second(look.messages(self._messages, first), look)
            if self._queued == queued:
                raise LLMBadResponse("the second look said nothing")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._queued != queued:
                raise
            log.warning("second look failed, the first answer stands: %s", exc)
            look.record["error"] = f"{type(exc).__name__}: {exc}"[:200]
            self._put(look.idk)
            return
        look.record["ms"] = round((time.perf_counter() - started) * 1000, 1)
        log.info("second look (source %s, coverage %s): %s", look.record.get("source"),
                 look.record.get("coverage"), look.record.get("outcome"))  # fmt: skip

    async def _relay_second(self, messages: list[dict[str, str]], look: Plan) -> None:
        """Streams the second look into the queue. Its first sentence is held until it is whole (`Plan.vet`): an answer
        that keeps to "I don't know", or puts words of the question the source does not hold into its mouth, ends
        there as the configured "I don't know" text."""
        text = look.lead()  # a prefilled answer: the backend streams only what follows it
        held = True
        async with self._request(messages, look) as stream:
            async for delta in stream:
                self._deltas += 1
                text += delta
                if not held:
                    self._put(delta)
                elif first_sentence_done(text):
                    held = False
                    if not look.vet(text):
                        break
                    self._put(text)
        if held and text.strip() and look.vet(text):
            self._put(text)  # all of it was one sentence
        if "outcome" in look.record and look.record["outcome"] != "answered":
            self._put(look.idk)

    def note_trace(self, trace: dict[str, Any]) -> None:
        """Records the second look (when an "I don't know" was considered for one) in the turn's trace."""
        record = self.second_look.record if self.second_look is not None else None
        if record:
            trace["second_look"] = dict(record)
            if record.get("outcome") == "answered":
                trace["answered_from"] = "second_look"

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
