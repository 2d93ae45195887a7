"""Streaming hold-back with real async generators: nothing unchecked reaches the user."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.guard.base import GuardDecision, RailResult
from app.pipeline.streaming import Finished, Released, hold_back

TEXT = (
    "To freeze your card, open the Larkspur app and choose Cards. Pick the card you want to freeze and "
    "tap Freeze. You can unfreeze it the same way at any time. If the card was stolen, report it instead "
    "so that we can send you a replacement right away."
)


class Generator:
    """A real async generator of small deltas that records how far it got and whether it was closed."""

    def __init__(self, text: str, delta: int = 7) -> None:
        self.text, self.delta = text, delta
        self.produced = 0
        self.closed = False

    async def deltas(self) -> AsyncIterator[str]:
        try:
            for i in range(0, len(self.text), self.delta):
                await asyncio.sleep(0)
                self.produced = i + self.delta
                yield self.text[i : i + self.delta]
        finally:
            self.closed = True


class Checker:
    def __init__(self, banned: str | None = None) -> None:
        self.banned = banned
        self.windows: list[str] = []

    async def __call__(self, window: str) -> GuardDecision:
        self.windows.append(window)
        if self.banned and self.banned in window:
            return GuardDecision(False, [RailResult("safety_output", "block")], "safety_output", "Refused.")
        return GuardDecision(True, [RailResult("safety_output", "allow")])


async def _collect(gen: Generator, check: Checker, chunk: int = 50, context: int = 30) -> tuple[list[str], Finished]:
    released: list[str] = []
    finished: list[Finished] = []
    async for event in hold_back(gen.deltas(), check, chunk_chars=chunk, context_chars=context):
        assert not finished, "nothing may follow Finished"
        if isinstance(event, Released):
            released.append(event.text)
        else:
            finished.append(event)
    assert len(finished) == 1
    return released, finished[0]


async def test_everything_passes_in_checked_chunks() -> None:
    gen, check = Generator(TEXT), Checker()
    released, done = await _collect(gen, check, chunk=50, context=30)
    assert "".join(released) == TEXT == done.full_text == done.released_text
    assert done.decision.allowed
    assert len(check.windows) == len(released)  # every released chunk was checked, the partial last one too
    for i, chunk in enumerate(released):
        assert len(chunk) <= 50
        if 0 < i < len(released) - 1:
            assert chunk.endswith(" ")  # cut on whitespace (the first window takes whole deltas)
        before = "".join(released[:i])
        preceding = before[-30:]
        if len(before) > 30 and not before[-31].isspace():  # cut mid-word: the fragment is dropped
            preceding = preceding[len(preceding.split(" ")[0]):]
        assert check.windows[i] == preceding + chunk  # the chunk plus up to context_chars (whole words) before it


async def test_a_block_mid_stream_releases_nothing_unchecked_and_closes_the_generator() -> None:
    gen, check = Generator(TEXT), Checker(banned="unfreeze")
    released, done = await _collect(gen, check, chunk=40, context=20)
    shown = "".join(released)
    assert "unfreeze" not in shown
    assert not done.decision.allowed and done.decision.refusal == "Refused." and done.released_text == shown
    assert gen.closed
    assert gen.produced < len(TEXT)  # generation stopped early instead of running to the end
    # each released chunk passed a check before it was shown
    assert all(any(w.endswith(chunk) for w in check.windows) for chunk in released)


async def test_the_final_partial_chunk_is_checked_too() -> None:
    gen, check = Generator("Short answer with a forbidden tail", delta=5), Checker(banned="tail")
    released, done = await _collect(gen, check, chunk=200, context=50)
    assert released == [] and not done.decision.allowed
    assert done.full_text == "Short answer with a forbidden tail" and done.released_text == ""


async def test_a_word_split_across_chunks_is_seen_whole_thanks_to_context() -> None:
    text = "aaaa bbbb cccc dddd eeee ffff gggg hhhh forbidden iiii"
    gen, check = Generator(text, delta=3), Checker(banned="forbidden")
    released, done = await _collect(gen, check, chunk=12, context=12)
    assert "forbidden" not in "".join(released) and not done.decision.allowed


async def test_consumer_leaving_early_closes_the_generator() -> None:
    gen = Generator(TEXT)
    stream = hold_back(gen.deltas(), Checker(), chunk_chars=20, context_chars=10)
    first = await anext(stream)
    assert isinstance(first, Released)
    await stream.aclose()  # type: ignore[attr-defined]
    assert gen.closed and gen.produced < len(TEXT)


async def test_long_words_are_cut_at_chunk_size() -> None:
    gen, check = Generator("x" * 95, delta=10), Checker()
    released, _ = await _collect(gen, check, chunk=30, context=0)
    assert [len(c) for c in released] == [30, 30, 30, 5]
    assert check.windows == released  # context 0: each check sees only its chunk


async def test_invalid_chunk_size() -> None:
    with pytest.raises(ValueError):
        await anext(hold_back(Generator("x").deltas(), Checker(), chunk_chars=0, context_chars=0))


async def test_the_first_window_is_the_first_delta_then_windows_grow() -> None:
    from app.pipeline.streaming import SECOND_WINDOW_CHARS

    text = "You can dispute a card payment in the app under Cards, then Dispute, within sixty days. " * 4
    gen, check = Generator(text, delta=5), Checker()
    released: list[str] = []
    async for event in hold_back(gen.deltas(), check, chunk_chars=100, context_chars=30, first_chunk_chars=1):
        if isinstance(event, Released):
            released.append(event.text)
    assert released[0] == text[:5]  # the first delta alone, whole: the first token waits for one check only
    assert "".join(released) == text
    assert all(len(chunk) >= SECOND_WINDOW_CHARS - 10 for chunk in released[1:-1])  # then few, larger windows
    assert len(check.windows) == len(released) <= 8


async def test_on_generated_sees_the_whole_answer_before_the_last_window_is_checked() -> None:
    gen, check = Generator(TEXT), Checker()
    calls: list[tuple[str, int]] = []  # (full text, windows checked by then)

    def on_generated(full: str) -> None:
        calls.append((full, len(check.windows)))

    async for _ in hold_back(gen.deltas(), check, chunk_chars=50, context_chars=30, on_generated=on_generated):
        pass
    assert len(calls) == 1
    full, checked_before = calls[0]
    assert full == TEXT
    # The last (partial) window was still to be checked when the whole answer was handed over.
    assert checked_before == len(check.windows) - 1


async def test_on_generated_is_not_called_when_the_stream_is_blocked() -> None:
    calls: list[str] = []
    async for _ in hold_back(
        Generator(TEXT).deltas(), Checker(banned="Freeze"), chunk_chars=50, context_chars=30, on_generated=calls.append
    ):
        pass
    assert calls == []


async def test_when_generation_has_ended_the_rest_is_checked_in_one_window() -> None:
    """A backend that answered at once: one check of the whole answer, not one per chunk in sequence."""

    async def whole() -> AsyncIterator[str]:
        yield TEXT

    assert len(TEXT) <= 4 * 100
    check = Checker()
    events = [e async for e in hold_back(whole(), check, chunk_chars=100, context_chars=30, ended=lambda: True)]
    assert check.windows == [TEXT]
    assert [e.text for e in events if isinstance(e, Released)] == [TEXT]
    # Without knowing it ended, the same text is cut into chunk-sized windows.
    check = Checker()
    [e async for e in hold_back(whole(), check, chunk_chars=100, context_chars=30)]
    assert len(check.windows) >= 3


async def test_an_ended_tail_longer_than_its_window_is_still_split_and_blocks() -> None:
    long_text = TEXT * 3  # > TAIL_CHUNKS * 50 chars
    banned = "report it instead"

    async def whole() -> AsyncIterator[str]:
        yield long_text

    check = Checker(banned=banned)
    events = [e async for e in hold_back(whole(), check, chunk_chars=50, context_chars=30, ended=lambda: True)]
    assert all(len(w) <= 4 * 50 + 30 for w in check.windows)
    finished = events[-1]
    assert isinstance(finished, Finished) and not finished.decision.allowed
    assert banned not in "".join(e.text for e in events if isinstance(e, Released))


async def test_a_window_never_ends_inside_a_figure() -> None:
    """Models stream digits a token at a time; the groundedness rail reads a figure's value, so "$4" of "$45"
    must not be checked (and blocked) alone, nor a figure's tail cut from the context before a window."""
    seen: list[str] = []

    async def check(text: str) -> GuardDecision:
        seen.append(text)
        return GuardDecision(True)

    async def deltas() -> AsyncIterator[str]:
        for d in ["$", "4", "5", " per", " wire", ", up", " to", " $", "25", ",", "000", " a", " day."]:
            await asyncio.sleep(0)
            yield d

    events = [e async for e in hold_back(deltas(), check, chunk_chars=12, context_chars=9, first_chunk_chars=1)]
    assert seen[0] == "$45 " or not seen[0].rstrip().endswith(("$", "4"))
    assert all(not w.startswith(("5,000", ",000", "000")) for w in seen), seen
    assert "".join(e.text for e in events if isinstance(e, Released)) == "$45 per wire, up to $25,000 a day."
