"""Build before announcing (app/admin/prepare.py), on real Redis: the other replicas build a new rails
version while it is published and swap the moment it is announced; a silent or failing replica delays a
publish by at most the prepare timeout and never replaces its good config with a bad one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from app.admin.prepare import Preparation, RedisPrepareChannel
from app.admin.publisher import RailsInvalid, RailsPublisher
from app.admin.versions import files_sha
from app.admin.versions_redis import RedisRailsVersionStore
from app.state import LiveRails
from tests.admin.helpers import (
    BASE_FILES,
    BlockedWordsGuard,
    GuardFactory,
    initial_live,
    redis_store_pair,
    with_blocked,
)
from tests.admin.helpers import yaml_validator as validator
from tests.admin.test_publisher import blocks, wait_for_version

GUNS = with_blocked(["bomb", "gun"])


class ClosableGuard(BlockedWordsGuard):
    closed = False

    async def aclose(self) -> None:
        self.closed = True


class SlowFactory(GuardFactory):
    """A builder that takes `delay_s` and records which version its replica served when each build ended."""

    def __init__(self, live: LiveRails, delay_s: float = 0.0) -> None:
        super().__init__()
        self.live, self.delay_s = live, delay_s
        self.guards: list[ClosableGuard] = []
        self.serving_when_built: list[str] = []

    async def __call__(self, files: dict[str, str]) -> ClosableGuard:
        await asyncio.sleep(self.delay_s)
        await super().__call__(files)  # counts the build, raises for `fail_on`
        self.guards.append(ClosableGuard(files))
        self.serving_when_built.append(self.live.current.version)
        return self.guards[-1]


@dataclass
class Replica:
    publisher: RailsPublisher
    live: LiveRails
    builder: SlowFactory

    @property
    def preparation(self) -> Preparation:
        assert self.publisher.preparation is not None
        return self.publisher.preparation


def replica(store: RedisRailsVersionStore, name: str, *, delay_s: float = 0.0, timeout_s: float = 30.0) -> Replica:
    live = initial_live()
    builder = SlowFactory(live, delay_s)
    channel = RedisPrepareChannel(store.redis, store.prefix, f"replica-{name}")
    preparation = Preparation(channel, builder, timeout_s=timeout_s)
    # A slow poll: what these tests see comes from the push paths (prepare + pub/sub), not the poll.
    publisher = RailsPublisher(
        store, live, validator=validator, builder=builder, poll_interval_s=30.0, preparation=preparation
    )
    return Replica(publisher, live, builder)


@asynccontextmanager
async def two_replicas(
    redis_url: str, *, b_build_s: float = 0.0, a_timeout_s: float = 30.0
) -> AsyncIterator[tuple[Replica, Replica]]:
    async with redis_store_pair(redis_url) as (store_a, store_b):
        await store_a.ensure_seeded(BASE_FILES)
        a, b = replica(store_a, "a", timeout_s=a_timeout_s), replica(store_b, "b", delay_s=b_build_s)
        await a.publisher.start()
        await b.publisher.start()
        try:
            assert await a.preparation.channel.peers() == {"replica-b"}  # B's heartbeat, sent at start
            await asyncio.sleep(0.2)  # let B's subscriptions reach Redis
            yield a, b
        finally:
            await asyncio.gather(a.publisher.stop(), b.publisher.stop())


async def test_the_other_replica_builds_before_the_publish_is_announced(redis_url: str) -> None:
    async with two_replicas(redis_url, b_build_s=0.5) as (a, b):
        await a.publisher.publish(1, GUNS, "block guns", "alice")
        # When A answered, B had already built version 2 while it still served version 1 ...
        assert b.builder.builds == 1 and b.builder.serving_when_built == ["1"]
        await wait_for_version(b.live, "2", timeout_s=5.0)
        # ... and swapped to that very guard when the version was announced, without building again.
        assert b.builder.builds == 1 and b.live.current.guard is b.builder.guards[0]
        assert await blocks(b.live)
        acks = await a.preparation.channel.acks(files_sha(GUNS))
        assert acks == {"replica-b": "ok"}


async def test_a_silent_replica_delays_a_publish_by_at_most_the_timeout(redis_url: str) -> None:
    async with two_replicas(redis_url, a_timeout_s=0.4) as (a, b):
        # A replica that sent a heartbeat and then died (or hangs): it never acks.
        ghost = RedisPrepareChannel(a.preparation.channel.redis, a.preparation.channel.prefix, "replica-ghost")
        await ghost.heartbeat()
        started = time.monotonic()
        version = await a.publisher.publish(1, GUNS, "block guns", "alice")
        waited = time.monotonic() - started
        assert version.number == 2 and a.live.current.version == "2"
        assert waited >= 0.4  # it did wait for the ghost, then published without it
        await wait_for_version(b.live, "2", timeout_s=5.0)
        assert b.builder.builds == 1


async def test_a_replica_that_cannot_build_acks_the_failure_and_keeps_its_config(redis_url: str) -> None:
    async with two_replicas(redis_url) as (a, b):
        b.builder.fail_on = "gun"  # e.g. this replica runs code that rejects the new config
        started = time.monotonic()
        await a.publisher.publish(1, GUNS, "block guns", "alice")
        assert time.monotonic() - started < 25.0  # the failure was acked: A did not wait out its 30 s
        acks = await a.preparation.channel.acks(files_sha(GUNS))
        assert acks["replica-b"].startswith("error:") and "gun" in acks["replica-b"]
        await b.publisher.sync()
        assert b.live.current.version == "1" and "version 2" in (b.publisher.last_sync_error or "")
        assert not await blocks(b.live)


async def test_a_prepared_guard_whose_version_never_goes_live_is_closed(redis_url: str) -> None:
    async with two_replicas(redis_url) as (a, b):
        request = await a.preparation.ask_peers(GUNS)  # staged, but A never publishes it (e.g. it lost the CAS)
        assert request is not None and request.peers == {"replica-b"}
        acks = await a.preparation.wait(request)
        assert acks == {"replica-b": "ok"} and len(b.builder.guards) == 1
        prepared = b.builder.guards[0]
        await b.preparation.tick()
        assert not prepared.closed  # kept for `keep_s`: the publish may still come
        b.preparation.keep_s = 0.0
        await b.preparation.tick()
        assert prepared.closed and b.live.current.version == "1"


async def test_a_draft_the_publisher_refuses_is_never_served_by_the_other_replica(redis_url: str) -> None:
    async with two_replicas(redis_url) as (a, b):
        broken = {**GUNS, "config.yml": GUNS["config.yml"].replace("rails:\n", "rails: [\n", 1)}
        with pytest.raises(RailsInvalid):
            await a.publisher.publish(1, broken, "broken", "alice")
        # B may have built the draft while A validated it, but nothing was announced: it keeps version 1.
        await asyncio.sleep(0.3)
        await b.publisher.sync()
        assert b.live.current.version == "1" and not await blocks(b.live)
        assert await a.publisher.store.live_number() == 1
