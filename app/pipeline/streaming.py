"""Streaming hold-back: the user never sees text the output rails have not passed.

Deltas from the LLM are buffered into chunks of about `chunk_chars` (cut on whitespace where
possible). Each chunk is checked together with up to `context_chars` of the text before it (so a
harmful sentence split across chunks is still seen whole), and released only once it passes. The
last, partial chunk is checked too. On a block we stop consuming the generator and close it, and finish
with the blocking decision; the caller cancels generation (app/pipeline/turn.py: the LLM runs in its own
task, which closing a queue reader does not stop).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from app.guard.base import GuardDecision


@dataclass
class Released:
    text: str


@dataclass
class Finished:
    decision: GuardDecision
    full_text: str  # everything generated (including what was withheld)
    released_text: str  # what the user saw


StreamEvent = Released | Finished

# After the first window, windows restart at this size and double up to `chunk_chars`: the reader is
# already reading, and fewer, larger windows mean fewer guard calls.
SECOND_WINDOW_CHARS = 40
# Once generation has ended, what is still held back is checked in windows of up to this many chunks: no
# later text can arrive to be released sooner, so one larger check beats several sequential ones.
TAIL_CHUNKS = 4


def _cut(buffer: str, chunk_chars: int) -> int:
    """Where to end the next chunk of a buffer at least `chunk_chars` long: after the last
    whitespace within the chunk, else (one long word) at chunk_chars."""
    window = buffer[:chunk_chars]
    last_space = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
    return last_space + 1 if last_space > 0 else chunk_chars


def _mid_figure(text: str) -> bool:
    """`text` may end inside a number ("$4", "1,", "4:", "1–"): models stream digits one token at a time."""
    return bool(text) and (text[-1] in "0123456789$,:–-" or (text[-1] == "." and text[-2:-1].isdigit()))


async def _close(deltas: AsyncIterator[str]) -> None:
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        result = aclose()
        if inspect.isawaitable(result):
            await result


async def hold_back(
    deltas: AsyncIterator[str],
    check: Callable[[str], Awaitable[GuardDecision]],
    *,
    chunk_chars: int,
    context_chars: int,
    first_chunk_chars: int = 40,
    on_generated: Callable[[str], None] | None = None,
    ended: Callable[[], bool] | None = None,
    tail_chars: int | None = None,
) -> AsyncIterator[StreamEvent]:
    """`first_chunk_chars`: the first window is small (1 = the first delta alone) so the first token reaches
    the user after one output check; the next is SECOND_WINDOW_CHARS and they double up to `chunk_chars`.
    Every window is still checked, with its preceding context, before it is released.
    `on_generated(full_text)` is called once when generation has ended without a block, before the last
    window's check: work on the whole answer (the groundedness flag) can then overlap that check.
    `ended()` says whether the source has already produced everything (fast backends, or text that piled up
    during a check): the rest is then checked in windows of up to `tail_chars` (TAIL_CHUNKS * `chunk_chars`)."""
    if chunk_chars <= 0:
        raise ValueError("chunk_chars must be positive")
    tail_chars = max(tail_chars or TAIL_CHUNKS * chunk_chars, chunk_chars)
    window = max(1, min(first_chunk_chars, chunk_chars))
    released = ""
    pending = ""
    full = ""
    last_decision = GuardDecision(allowed=True)

    async def check_chunk(chunk: str) -> GuardDecision:
        preceding = released[-context_chars:] if context_chars > 0 else ""
        if len(preceding) < len(released) and not released[-context_chars - 1].isspace():
            # Cut mid-word: drop the fragment ("5,000" of "$25,000"), which the groundedness rail would read as
            # a figure no source states.
            preceding = preceding[next((i for i, ch in enumerate(preceding) if ch.isspace()), len(preceding)):]
        return await check(preceding + chunk)

    try:
        async for delta in deltas:
            if not delta:
                continue
            full += delta
            pending += delta
            while len(pending) >= window:
                if ended is not None and len(pending) <= tail_chars and ended():
                    break  # all of it is here: the tail check below takes it in one call
                # The first window takes whole deltas (never "Y" of "You"); later ones cut on whitespace.
                end = len(pending) if not released and len(pending) <= chunk_chars else _cut(pending, window)
                if end == len(pending) and _mid_figure(pending):
                    break  # "$4" of "$45": a figure is checked whole (the groundedness rail reads its value)
                chunk, pending = pending[:end], pending[end:]
                window = min(max(window * 2, SECOND_WINDOW_CHARS), chunk_chars)
                last_decision = await check_chunk(chunk)
                if not last_decision.allowed:
                    await _close(deltas)
                    yield Finished(last_decision, full, released)
                    return
                released += chunk
                yield Released(chunk)
        if on_generated is not None:
            on_generated(full)
        while pending:
            end = len(pending) if len(pending) <= tail_chars else _cut(pending, tail_chars)
            chunk, pending = pending[:end], pending[end:]
            last_decision = await check_chunk(chunk)
            if not last_decision.allowed:
                yield Finished(last_decision, full, released)
                return
            released += chunk
            yield Released(chunk)
        yield Finished(last_decision, full, released)
    finally:
        # Also when our consumer stops early (client gone): never leave generation running.
        await _close(deltas)
