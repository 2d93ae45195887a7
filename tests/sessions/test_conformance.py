"""Behaviour every SessionStore must share, run against MemorySessionStore and RedisSessionStore."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.sessions.base import SessionNotFound, Turn
from app.sessions.redis import SessionBusy
from tests.sessions.conftest import StoreMaker


def make_turn(n: int, **fields: object) -> Turn:
    return Turn(user=f"question {n}", answer=f"answer {n}", **fields)  # type: ignore[arg-type]


async def test_create_and_get(make_store: StoreMaker) -> None:
    store = make_store()
    before = time.time()
    info = await store.create(owner="key-hash-1")
    assert len(info.id) == 32
    assert before <= info.created_at <= time.time()
    assert (info.owner, info.turn_count) == ("key-hash-1", 0)
    assert await store.get(info.id) == info

    anonymous = await store.create()
    assert anonymous.owner is None and anonymous.id != info.id
    assert await store.get(anonymous.id) == anonymous
    assert await store.history(info.id) == []


async def test_unknown_session(make_store: StoreMaker) -> None:
    store = make_store()
    for session_id in ["0" * 32, "not a valid {id}", ""]:
        assert await store.get(session_id) is None
        with pytest.raises(SessionNotFound):
            await store.history(session_id)
        with pytest.raises(SessionNotFound):
            await store.append(session_id, make_turn(1))
        with pytest.raises(SessionNotFound):
            await store.set_feedback(session_id, "any-turn", 1)
        assert await store.delete(session_id) is False


async def test_turn_round_trip_keeps_every_field(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    turn = Turn(
        user="Ünïcode ✓ and \"quotes\" and {braces}",
        answer="line one\nline two",
        status="blocked",
        blocked=True,
        created_at=1718000000.123456789,
        metadata={
            "rails": {"input": {"decision": "block", "scores": [0.1, 0.999999]}},
            "citations": [],
            "empty": {},
            "timings_ms": {"retrieve": 12.5, "generate": 3},
            "trace": None,
        },
    )
    await store.append(session.id, turn)
    [stored] = await store.history(session.id)
    assert stored == turn
    assert stored.metadata["citations"] == [] and stored.metadata["empty"] == {}


async def test_append_counts_and_keeps_order(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    turns = [make_turn(n) for n in range(3)]
    for turn in turns:
        await store.append(session.id, turn)
    assert await store.history(session.id) == turns
    info = await store.get(session.id)
    assert info is not None and info.turn_count == 3


async def test_the_same_turn_appended_again_is_stored_once(make_store: StoreMaker) -> None:
    """A client retrying a write whose reply was lost must not double the turn."""
    store = make_store()
    session = await store.create()
    turn = make_turn(1)
    await store.append(session.id, turn)
    await store.append(session.id, turn)
    assert await store.history(session.id) == [turn]
    info = await store.get(session.id)
    assert info is not None and info.turn_count == 1


async def test_trims_oldest_turns_beyond_max_turns(make_store: StoreMaker) -> None:
    store = make_store(max_turns=3)
    session = await store.create()
    turns = [make_turn(n) for n in range(5)]
    for turn in turns:
        await store.append(session.id, turn)
    assert await store.history(session.id) == turns[2:]
    info = await store.get(session.id)
    assert info is not None and info.turn_count == 5  # turns ever appended, not turns kept


async def test_delete(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    await store.append(session.id, make_turn(1))
    assert await store.delete(session.id) is True
    assert await store.get(session.id) is None
    with pytest.raises(SessionNotFound):
        await store.history(session.id)
    with pytest.raises(SessionNotFound):
        await store.append(session.id, make_turn(2))
    assert await store.delete(session.id) is False


async def test_set_feedback_changes_only_that_turn(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    turns = [make_turn(n, metadata={"citations": [], "score": 0.123456789012345}) for n in range(3)]
    for turn in turns:
        await store.append(session.id, turn)

    await store.set_feedback(session.id, turns[1].id, 1)
    await store.set_feedback(session.id, turns[0].id, -1)
    await store.set_feedback(session.id, turns[0].id, 1)  # changing one's mind works too
    await store.set_feedback(session.id, turns[2].id, -1)
    expected = [
        turns[0].model_copy(update={"feedback": 1}),
        turns[1].model_copy(update={"feedback": 1}),
        turns[2].model_copy(update={"feedback": -1}),
    ]
    assert await store.history(session.id) == expected

    with pytest.raises(SessionNotFound):
        await store.set_feedback(session.id, "no-such-turn", 1)
    assert await store.history(session.id) == expected


async def test_callers_cannot_mutate_stored_turns(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    turn = make_turn(1, metadata={"citations": [{"id": 1}]})
    await store.append(session.id, turn)
    turn.metadata["citations"].append({"id": 2})  # the caller's object, after append

    [loaded] = await store.history(session.id)
    loaded.metadata["citations"].clear()
    loaded.answer = "changed"

    [again] = await store.history(session.id)
    assert again.answer == "answer 1"
    assert again.metadata == {"citations": [{"id": 1}]}


async def test_ttl_expires_idle_sessions_and_use_refreshes_it(make_store: StoreMaker) -> None:
    store = make_store(ttl_s=0.6)
    session = await store.create()
    await asyncio.sleep(0.4)
    await store.history(session.id)  # refresh: expires 0.6s from now
    await asyncio.sleep(0.4)  # 0.8s after create: alive only thanks to the refresh
    await store.append(session.id, make_turn(1))  # refresh again
    await asyncio.sleep(0.4)
    assert len(await store.history(session.id)) == 1
    await asyncio.sleep(0.9)
    assert await store.get(session.id) is None
    with pytest.raises(SessionNotFound):
        await store.history(session.id)


async def test_lock_serializes_turns_in_arrival_order(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    events: list[str] = []

    async def turn(n: int) -> None:
        async with store.lock(session.id):
            events.append(f"start {n}")
            seen = await store.history(session.id)
            await asyncio.sleep(0.05)  # a slow LLM call, inviting interleaving
            await store.append(session.id, Turn(user=f"turn {n}", answer=f"saw {len(seen)}"))
            events.append(f"end {n}")

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(turn(n)))
        await asyncio.sleep(0.01)  # arrive one after another
    await asyncio.gather(*tasks)

    assert events == [f"{edge} {n}" for n in range(4) for edge in ("start", "end")]
    history = await store.history(session.id)
    assert [(t.user, t.answer) for t in history] == [(f"turn {n}", f"saw {n}") for n in range(4)]


async def test_lock_is_per_session(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=0.5)
    first, second = await store.create(), await store.create()
    async with store.lock(first.id):
        started = time.monotonic()
        async with store.lock(second.id):
            assert time.monotonic() - started < 0.3


async def test_lock_wait_timeout_raises_session_busy(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=0.3)
    session = await store.create()
    async with store.lock(session.id):
        started = time.monotonic()
        with pytest.raises(SessionBusy):
            async with store.lock(session.id):
                pytest.fail("entered a lock that is held")
        assert 0.2 < time.monotonic() - started < 1.5
    async with store.lock(session.id):  # free again once released
        pass


async def test_lock_released_when_turn_fails(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=0.5)
    session = await store.create()
    with pytest.raises(RuntimeError):
        async with store.lock(session.id):
            raise RuntimeError("generation failed")
    async with store.lock(session.id):
        pass


async def test_history_can_read_only_the_last_turns(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    for n in range(5):
        await store.append(session.id, make_turn(n))
    assert [t.user for t in await store.history(session.id, last=2)] == ["question 3", "question 4"]
    assert [t.user for t in await store.history(session.id, last=50)] == [f"question {n}" for n in range(5)]
    assert await store.history(session.id, last=0) == []
    assert len(await store.history(session.id)) == 5
    with pytest.raises(SessionNotFound):
        await store.history("0" * 32, last=0)  # still a missing session, even when no turns are wanted
