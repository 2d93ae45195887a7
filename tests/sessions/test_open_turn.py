"""`open_turn` → `commit`, a chat turn's hold on its session, on the memory store and a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from app.sessions.base import SessionNotFound, Turn
from app.sessions.redis import RedisSessionStore, SessionBusy
from tests.sessions.conftest import StoreMaker


def make_turn(n: int) -> Turn:
    return Turn(user=f"question {n}", answer=f"answer {n}")


async def assert_lock_is_free(store: object, session_id: str) -> None:
    started = time.monotonic()
    async with store.lock(session_id):  # type: ignore[attr-defined]
        pass
    assert time.monotonic() - started < 0.25, "the session was still held"


async def test_open_turn_reads_the_last_turns_and_commit_stores_the_turn(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=1.0)
    session = await store.create()
    for n in range(5):
        await store.append(session.id, make_turn(n))
    async with store.open_turn(session.id, last=2) as held:
        assert [t.user for t in held.history] == ["question 3", "question 4"]
        await held.commit(make_turn(5))
        await assert_lock_is_free(store, session.id)  # commit let go of the session already
    assert [t.user for t in await store.history(session.id)] == [f"question {n}" for n in range(6)]
    assert (await store.get(session.id)).turn_count == 6  # type: ignore[union-attr]


async def test_open_turn_with_no_history_asked_for(make_store: StoreMaker) -> None:
    store = make_store()
    session = await store.create()
    await store.append(session.id, make_turn(0))
    async with store.open_turn(session.id, last=0) as held:
        assert held.history == []


@pytest.mark.parametrize("session_id", ["0" * 32, "not a valid id!", ""])
async def test_open_turn_of_an_unknown_session_raises(make_store: StoreMaker, session_id: str) -> None:
    store = make_store()
    with pytest.raises(SessionNotFound):
        async with store.open_turn(session_id, last=4):
            raise AssertionError("entered an unknown session")


async def test_open_turn_checks_the_owner_without_waiting_for_the_lock(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=2.0)
    owned = await store.create(owner="key-a")
    anonymous = await store.create()
    for session_id, stranger in ((owned.id, "key-b"), (owned.id, None), (anonymous.id, "key-a")):
        async with store.open_turn(session_id, last=4, owner="key-a" if session_id == owned.id else None,
                                   check_owner=True):
            started = time.monotonic()
            with pytest.raises(SessionNotFound):  # at once: a stranger never queues behind the owner's turn
                async with store.open_turn(session_id, last=4, owner=stranger, check_owner=True):
                    raise AssertionError("a stranger entered the session")
            assert time.monotonic() - started < 0.5
    async with store.open_turn(owned.id, last=4, owner="key-b"):  # no check asked for (the UI's own sessions)
        pass


async def test_leaving_without_commit_releases_and_stores_nothing(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=1.0)
    session = await store.create()
    with pytest.raises(RuntimeError):
        async with store.open_turn(session.id, last=4):
            raise RuntimeError("the turn failed")
    await assert_lock_is_free(store, session.id)
    assert await store.history(session.id) == []


async def test_open_turns_of_one_session_run_one_after_another(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=5.0)
    session = await store.create()
    seen: list[int] = []

    async def turn(n: int) -> None:
        async with store.open_turn(session.id, last=10) as held:
            seen.append(len(held.history))
            await asyncio.sleep(0.03)  # a slow LLM call, inviting interleaving
            await held.commit(make_turn(n))

    await asyncio.gather(*(turn(n) for n in range(4)))
    assert seen == [0, 1, 2, 3]  # each turn saw every turn committed before it


async def test_a_held_session_makes_the_next_turn_wait_then_give_up(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=0.3)
    session = await store.create()
    async with store.open_turn(session.id, last=4):
        with pytest.raises(SessionBusy):
            async with store.open_turn(session.id, last=4):
                raise AssertionError("two turns held one session")


async def test_commit_after_the_session_was_deleted_raises_and_releases(make_store: StoreMaker) -> None:
    store = make_store(lock_wait_s=1.0)
    session = await store.create()
    with pytest.raises(SessionNotFound):
        async with store.open_turn(session.id, last=4) as held:
            assert await store.delete(session.id)
            await held.commit(make_turn(0))
    await assert_lock_is_free(store, session.id)
    assert await store.get(session.id) is None


async def test_redis_commit_stops_renewing_before_it_releases(
    redis_store_factory: StoreMaker, caplog: pytest.LogCaptureFixture
) -> None:
    """The lock is renewed every lock_ttl/3 while held; a renewal after commit released it would find the lock
    gone and warn that it was lost."""
    store = redis_store_factory(lock_ttl_s=0.15)
    assert isinstance(store, RedisSessionStore)
    session = await store.create()
    with caplog.at_level(logging.WARNING, logger="app.sessions.redis"):
        async with store.open_turn(session.id, last=4) as held:
            await asyncio.sleep(0.12)  # renewed at least twice: the turn still holds the session
            await held.commit(make_turn(0))
            await asyncio.sleep(0.15)  # would be several renewals
    assert not [r for r in caplog.records if "lock" in r.getMessage()], caplog.text
    assert len(await store.history(session.id)) == 1
