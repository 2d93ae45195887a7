"""`model_time`: spans recorded in a turn's context (and its tasks), merged so overlaps count once."""

from __future__ import annotations

import asyncio
import time

from app.observability import model_time


def test_covered_ms_merges_overlaps_and_clips_to_the_turn() -> None:
    spans = [(1.000, 1.010), (1.005, 1.020), (1.030, 1.040), (0.990, 1.001), (1.050, 1.200)]
    # [1.000, 1.020] (the span before the turn clipped) + [1.030, 1.040] + [1.050, 1.100] (clipped at the end)
    assert round(model_time.covered_ms(spans, since=1.000, until=1.100), 6) == 80.0
    assert model_time.covered_ms([], since=0.0, until=1.0) == 0.0
    assert model_time.covered_ms([(2.0, 3.0)], since=0.0, until=1.0) == 0.0


async def test_spans_reach_the_turn_from_its_tasks_and_threads_only() -> None:
    async def outside() -> None:  # another request's task, started before this turn began
        await asyncio.sleep(0.01)
        with model_time.span():
            await asyncio.sleep(0.01)

    other = asyncio.create_task(outside())
    spans = model_time.begin()

    async def call() -> None:
        with model_time.span():
            await asyncio.sleep(0.02)

    def in_thread() -> None:
        model_time.record(time.perf_counter() - 0.001)

    await asyncio.gather(call(), asyncio.create_task(call()))
    await asyncio.to_thread(in_thread)
    await other
    assert len(spans) == 3
    assert all(end - start >= 0.0009 for start, end in spans)

