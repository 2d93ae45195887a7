"""RedisSessionStore specifics: key TTLs, atomic writes, the cross-replica lock, outages and restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis.asyncio as redis_async
from redis.asyncio.lock import Lock

from app.sessions.base import SessionNotFound, StoreUnavailable, Turn
from app.sessions.redis import RedisSessionStore, SessionBusy, redact_url
from tests.fixtures.redis import RedisProcess, StoreFactory


def make_turn(n: int) -> Turn:
    return Turn(user=f"question {n}", answer=f"answer {n}")


async def session_keys(url: str, pattern: str) -> dict[str, int]:
    """{key: PTTL} for the keys matching pattern."""
    client = redis_async.Redis.from_url(url, decode_responses=True)
    try:
        return {key: await client.pttl(key) async for key in client.scan_iter(match=pattern)}
    finally:
        await client.aclose()


async def test_ttl_is_set_on_every_key_and_refreshed_on_use(redis_store_factory: StoreFactory, redis_url: str) -> None:
    store = redis_store_factory(ttl_s=100)
    session = await store.create()
    await store.append(session.id, make_turn(1))
    keys = await session_keys(redis_url, f"*{session.id}*")
    assert len(keys) == 2  # meta + turns
    assert all(95_000 < ttl <= 100_000 for ttl in keys.values()), keys

    client = redis_async.Redis.from_url(redis_url, decode_responses=True)
    try:
        for key in keys:
            await client.pexpire(key, 5_000)
        await store.history(session.id)
        assert all(95_000 < ttl <= 100_000 for ttl in (await session_keys(redis_url, f"*{session.id}*")).values())
        for key in keys:
            await client.pexpire(key, 5_000)
        await store.set_feedback(session.id, (await store.history(session.id))[0].id, 1)
        assert all(95_000 < ttl <= 100_000 for ttl in (await session_keys(redis_url, f"*{session.id}*")).values())
    finally:
        await client.aclose()


async def test_append_to_a_vanished_session_writes_nothing(redis_store: RedisSessionStore, redis_url: str) -> None:
    session = await redis_store.create()
    await redis_store.delete(session.id)
    with pytest.raises(SessionNotFound):
        await redis_store.append(session.id, make_turn(1))
    assert await session_keys(redis_url, f"*{session.id}*") == {}


async def test_history_survives_a_new_store_object(redis_store_factory: StoreFactory) -> None:
    """A server restart builds a new store; the conversation is still there."""
    first = redis_store_factory()
    session = await first.create(owner="owner-hash")
    turns = [make_turn(n) for n in range(3)]
    for turn in turns:
        await first.append(session.id, turn)
    await first.set_feedback(session.id, turns[1].id, -1)
    await first.aclose()

    second = redis_store_factory()
    assert await second.get(session.id) == session.model_copy(update={"turn_count": 3})
    assert await second.history(session.id) == [turns[0], turns[1].model_copy(update={"feedback": -1}), turns[2]]


async def test_feedback_patch_leaves_the_stored_json_otherwise_byte_identical(
    redis_store: RedisSessionStore, redis_url: str
) -> None:
    session = await redis_store.create()
    turn = Turn(user="q", answer="a", created_at=1718000000.123456789, metadata={"citations": [], "feedback": 5})
    await redis_store.append(session.id, turn)
    client = redis_async.Redis.from_url(redis_url, decode_responses=True)
    try:
        [turns_key] = [key for key in await session_keys(redis_url, f"*{session.id}*") if key.endswith(":turns")]
        [before] = cast(list[str], await client.lrange(turns_key, 0, -1))
        await redis_store.set_feedback(session.id, turn.id, -1)
        [after] = cast(list[str], await client.lrange(turns_key, 0, -1))
    finally:
        await client.aclose()
    assert before.endswith(',"feedback":null}')
    assert after == before.removesuffix(',"feedback":null}') + ',"feedback":-1}'
    [stored] = await redis_store.history(session.id)
    assert stored.metadata == {"citations": [], "feedback": 5} and stored.feedback == -1


async def test_lock_serializes_turns_across_replicas_in_arrival_order(redis_store_factory: StoreFactory) -> None:
    replicas = [redis_store_factory(), redis_store_factory(), redis_store_factory()]
    session = await replicas[0].create()
    events: list[str] = []

    async def turn(n: int) -> None:
        store = replicas[n % 3]
        async with store.lock(session.id):
            events.append(f"start {n}")
            seen = await store.history(session.id)
            await asyncio.sleep(0.05)
            await store.append(session.id, Turn(user=f"turn {n}", answer=f"saw {len(seen)}"))
            events.append(f"end {n}")

    tasks = []
    for n in range(6):
        tasks.append(asyncio.create_task(turn(n)))
        await asyncio.sleep(0.015)  # arrive one after another, alternating replicas
    await asyncio.gather(*tasks)

    assert events == [f"{edge} {n}" for n in range(6) for edge in ("start", "end")]
    history = await replicas[1].history(session.id)
    assert [(t.user, t.answer) for t in history] == [(f"turn {n}", f"saw {n}") for n in range(6)]


async def test_a_waiter_that_vanished_holds_up_the_queue_only_briefly(
    redis_store_factory: StoreFactory, redis_url: str
) -> None:
    store = redis_store_factory(lock_waiter_ttl_s=0.5, lock_wait_s=5)
    session = await store.create()
    keys = store._lock_keys(session.id)
    async with store.lock(session.id):
        # A replica queues for the lock (one poll) and dies: it sits at the head of the queue.
        assert await store._lock_acquire_script(keys=keys, args=["dead-waiter", 30_000, 500]) == 0
        await asyncio.sleep(0.1)
    started = time.monotonic()
    async with store.lock(session.id):
        waited = time.monotonic() - started
    assert 0.2 < waited < 2.0


async def test_giving_up_leaves_the_queue(redis_store_factory: StoreFactory, redis_url: str) -> None:
    holder, impatient, patient = redis_store_factory(), redis_store_factory(lock_wait_s=0.2), redis_store_factory()
    session = await holder.create()
    async with holder.lock(session.id):
        with pytest.raises(SessionBusy):
            async with impatient.lock(session.id):
                pytest.fail("entered a lock that is held")
    started = time.monotonic()
    async with patient.lock(session.id):  # not stuck behind the waiter that gave up
        assert time.monotonic() - started < 0.3
    leftovers = await session_keys(redis_url, f"*{session.id}*:lock*")
    assert set(leftovers) <= {holder._lock_key(session.id) + ":seq"}  # only the arrival counter, expiring
    assert all(0 < ttl <= 3_000 for ttl in leftovers.values())


async def test_a_crashed_holder_blocks_only_until_the_lock_ttl(
    redis_store_factory: StoreFactory, redis_url: str
) -> None:
    store = redis_store_factory(lock_wait_s=5)
    session = await store.create()
    # A replica that took the lock and died: nobody will renew or release it.
    crashed_client = redis_async.Redis.from_url(redis_url)
    try:
        lock_key = store._lock_key(session.id)
        assert await Lock(crashed_client, lock_key, timeout=0.5, thread_local=False).acquire(blocking=False)
        started = time.monotonic()
        async with store.lock(session.id):
            waited = time.monotonic() - started
    finally:
        await crashed_client.aclose()
    assert 0.3 < waited < 2.0


async def test_a_live_holder_keeps_its_lock_beyond_the_lock_ttl(redis_store_factory: StoreFactory) -> None:
    holder = redis_store_factory(lock_ttl_s=0.3)
    other_replica = redis_store_factory(lock_wait_s=0.8)
    session = await holder.create()
    async with holder.lock(session.id):
        with pytest.raises(SessionBusy):
            async with other_replica.lock(session.id):  # the lock TTL passes twice meanwhile
                pytest.fail("entered a lock that is held and renewed")
    async with other_replica.lock(session.id):
        pass


async def test_redis_outage_fails_fast_and_the_same_store_recovers(redis_process: RedisProcess) -> None:
    store = RedisSessionStore(redis_process.url, ttl_s=3600, max_turns=10, key_prefix="outage:")
    try:
        session = await store.create()
        await store.append(session.id, make_turn(1))

        redis_process.kill()
        operations: dict[str, Callable[[], Awaitable[object]]] = {
            "ping": store.ping,
            "create": store.create,
            "get": lambda: store.get(session.id),
            "history": lambda: store.history(session.id),
            "append": lambda: store.append(session.id, make_turn(2)),
            "set_feedback": lambda: store.set_feedback(session.id, "x", 1),
            "delete": lambda: store.delete(session.id),
        }
        for name, operation in operations.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await operation()
            assert time.monotonic() - started < 1.5, name
        with pytest.raises(StoreUnavailable):
            async with store.lock(session.id):
                pytest.fail("locked without Redis")

        redis_process.start()  # same port, empty (not persistent): like a fresh Redis
        await store.ping()
        fresh = await store.create()
        await store.append(fresh.id, make_turn(3))
        async with store.lock(fresh.id):
            assert [t.answer for t in await store.history(fresh.id)] == ["answer 3"]
    finally:
        await store.aclose()


async def test_unanswering_redis_times_out_within_about_a_second() -> None:
    """A host that accepts TCP but never answers (hung Redis, half-open network) must not hang a turn."""
    held_open: list[asyncio.StreamWriter] = []

    def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held_open.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    store = RedisSessionStore(f"redis://127.0.0.1:{port}/0", ttl_s=60, max_turns=5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - started < 2.0
    finally:
        await store.aclose()
        silent.close()
        for writer in held_open:
            writer.close()


async def test_errors_never_show_the_password() -> None:
    with RedisProcess(password="s3cret-pw") as process:
        store = RedisSessionStore(process.url, ttl_s=60, max_turns=5)
        try:
            await store.ping()
            process.stop()
            with pytest.raises(StoreUnavailable) as raised:
                await store.ping()
        finally:
            await store.aclose()
    assert "s3cret-pw" not in str(raised.value)
    assert f"127.0.0.1:{process.port}" in str(raised.value)

    wrong = RedisSessionStore(process.url.replace("s3cret-pw", "wrong-pw"), ttl_s=60, max_turns=5)
    with RedisProcess(password="s3cret-pw", port=process.port):
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await wrong.ping()
        finally:
            await wrong.aclose()
    assert "wrong-pw" not in str(raised.value)


def test_redact_url() -> None:
    assert redact_url("redis://:pw@host:6380/1") == "redis://:***@host:6380/1"
    assert redact_url("rediss://user:pw@[::1]:6379/0") == "rediss://user:***@[::1]:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"

