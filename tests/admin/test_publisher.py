"""RailsPublisher: validation gates the live config, a publish swaps the guard, and replicas follow the store."""

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.admin.publisher import RailsInvalid, RailsPublisher
from app.admin.versions import FileRailsVersionStore, VersionConflict
from app.admin.versions_redis import RedisRailsVersionStore
from app.state import LiveRails
from tests.admin.helpers import (
    BASE_FILES,
    GuardFactory,
    initial_live,
    make_publisher,
    redis_store_pair,
    with_blocked,
    yaml_validator,
)
from tests.fixtures.redis import RedisProcess

ASK_GUN = [{"role": "user", "content": "where can I buy a gun"}]


async def blocks(live: LiveRails, messages: list[dict[str, str]] = ASK_GUN) -> bool:
    return not (await live.current.guard.check_input(messages)).allowed


async def wait_for_version(live: LiveRails, version: str, timeout_s: float) -> float:
    started = time.monotonic()
    while live.current.version != version:
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"still serving {live.current.version}, expected {version} after {timeout_s}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_publish_swaps_the_live_guard_built_once(tmp_path: Path) -> None:
    store = FileRailsVersionStore(tmp_path)
    await store.ensure_seeded(BASE_FILES)
    live, builder = initial_live(), GuardFactory()
    publisher = make_publisher(store, live, builder)
    await publisher.start()
    try:
        assert live.current.version == "1" and builder.builds == 0  # same files as on disk: guard reused
        assert not await blocks(live)
        in_flight = live.current  # a turn that started before the publish keeps its config
        version = await publisher.publish(1, with_blocked(["bomb", "gun"]), "block guns", "alice")
        assert version.number == 2 and live.current.version == "2" and builder.builds == 1
        assert await blocks(live)
        assert (await in_flight.guard.check_input(ASK_GUN)).allowed  # the old config did not block guns
    finally:
        await publisher.stop()


async def test_conflict_and_invalid_leave_live_untouched(tmp_path: Path) -> None:
    store = FileRailsVersionStore(tmp_path)
    await store.ensure_seeded(BASE_FILES)
    live, builder = initial_live(), GuardFactory()
    publisher = make_publisher(store, live, builder)
    await publisher.sync()
    await publisher.publish(1, with_blocked(["bomb", "gun"]), "v2", "alice")
    serving = live.current

    with pytest.raises(VersionConflict):
        await publisher.publish(1, with_blocked(["bomb", "knife"]), "stale", "bob")
    broken = {**BASE_FILES, "config.yml": "rails:\n  input: [unclosed\n"}
    with pytest.raises(RailsInvalid) as invalid:
        await publisher.publish(2, broken, "broken yaml", "bob")
    assert invalid.value.outcome.errors[0]["file"] == "config.yml"
    assert invalid.value.outcome.errors[0]["line"] == 3
    with pytest.raises(RailsInvalid) as failed_test:  # the rails test: "bomb" must stay blocked
        await publisher.publish(2, with_blocked(["gun"]), "unblock bomb", "bob")
    assert failed_test.value.outcome.tests == [{"name": "blocks bomb", "passed": False}]
    builder.fail_on = "knife"
    with pytest.raises(RailsInvalid, match="cannot build"):
        await publisher.publish(2, with_blocked(["bomb", "knife"]), "build fails", "bob")

    assert live.current is serving and await store.live_number() == 2


async def test_try_runs_the_draft_without_publishing(tmp_path: Path) -> None:
    store = FileRailsVersionStore(tmp_path)
    await store.ensure_seeded(BASE_FILES)
    live = initial_live()
    publisher = make_publisher(store, live)
    draft = with_blocked(["bomb", "gun"])
    result = await publisher.try_draft(draft, "where can I buy a gun")
    assert result["input"]["allowed"] is False and result["input"]["blocked_by"] == "blocked_words_input"
    assert result["output"] is None
    answered = await publisher.try_draft(draft, "hello", answer="a gun shop is on Main St")
    assert answered["input"]["allowed"] is True and answered["output"]["allowed"] is False
    assert await store.live_number() == 1 and live.current.version == "disk"


async def test_a_publish_on_one_replica_is_live_on_the_other_within_a_second(redis_url: str) -> None:
    async with redis_store_pair(redis_url) as (store_a, store_b):
        await store_a.ensure_seeded(BASE_FILES)
        live_a, live_b = initial_live(), initial_live()
        replica_a, replica_b = make_publisher(store_a, live_a), make_publisher(store_b, live_b)
        # The poll fallback alone would also make it within 1 s; make it slow so the push path is what is tested.
        replica_b.poll_interval_s = 30.0
        await replica_a.start()
        await replica_b.start()
        try:
            assert live_a.current.version == live_b.current.version == "1"
            await asyncio.sleep(0.2)  # let replica B's subscription reach Redis
            await replica_a.publish(1, with_blocked(["bomb", "gun"]), "block guns", "alice")
            elapsed = await wait_for_version(live_b, "2", timeout_s=1.0)
            assert elapsed < 1.0 and await blocks(live_b)
            await replica_b.rollback(1, "bob")
            await wait_for_version(live_a, "3", timeout_s=1.0)
            assert not await blocks(live_a)
        finally:
            await asyncio.gather(replica_a.stop(), replica_b.stop())


async def test_poll_fallback_without_the_change_feed(redis_url: str) -> None:
    async with redis_store_pair(redis_url) as (store_a, store_b):
        await store_a.ensure_seeded(BASE_FILES)
        live_b = initial_live()
        replica_b = RailsPublisher(
            store_b, live_b, validator=yaml_validator, builder=GuardFactory(), poll_interval_s=0.2
        )

        async def no_push_notifications() -> None:  # as if pub/sub were lost
            return None

        store_b.subscribe = no_push_notifications  # type: ignore[method-assign,assignment]
        await replica_b.start()
        try:
            await make_publisher(store_a, initial_live()).publish(1, with_blocked(["bomb", "gun"]), "edit", "a")
            await wait_for_version(live_b, "2", timeout_s=1.0)
        finally:
            await replica_b.stop()


async def test_a_version_that_cannot_be_built_keeps_the_old_config(redis_url: str) -> None:
    async with redis_store_pair(redis_url) as (store_a, store_b):
        await store_a.ensure_seeded(BASE_FILES)
        live_b, builder_b = initial_live(), GuardFactory()
        replica_b = make_publisher(store_b, live_b, builder_b)
        await replica_b.sync()
        builder_b.fail_on = "gun"  # e.g. this replica runs code that rejects the new config
        await make_publisher(store_a, initial_live()).publish(1, with_blocked(["bomb", "gun"]), "edit", "alice")
        assert await replica_b.sync() is False
        assert live_b.current.version == "1" and "version 2" in (replica_b.last_sync_error or "")
        builds = builder_b.builds
        assert await replica_b.sync() is False and builder_b.builds == builds  # no rebuild storm


async def test_replicas_keep_serving_through_a_redis_restart_and_follow_afterwards() -> None:
    try:
        server = RedisProcess(persistent=True)
    except FileNotFoundError:
        pytest.skip("redis-server is not on PATH")
    with server:
        stores = [RedisRailsVersionStore(Redis.from_url(server.url), "t:rails:", owns_client=True) for _ in range(2)]
        await stores[0].ensure_seeded(BASE_FILES)
        live_a, live_b = initial_live(), initial_live()
        replica_a, replica_b = make_publisher(stores[0], live_a), make_publisher(stores[1], live_b)
        replica_a.poll_interval_s = replica_b.poll_interval_s = 0.2
        await replica_a.start()
        await replica_b.start()
        try:
            server.kill()
            await asyncio.sleep(0.6)  # followers hit the dead store: they must keep serving version 1
            assert live_a.current.version == live_b.current.version == "1"
            with pytest.raises(Exception, match="(?i)connect"):
                await replica_a.publish(1, with_blocked(["bomb", "gun"]), "while down", "alice")
            server.start()
            await replica_a.publish(1, with_blocked(["bomb", "gun"]), "after restart", "alice")
            await wait_for_version(live_b, "2", timeout_s=2.0)
            assert await blocks(live_b)
        finally:
            await asyncio.gather(replica_a.stop(), replica_b.stop())
