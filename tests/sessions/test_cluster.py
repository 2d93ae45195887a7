"""Redis Cluster: every script and transaction touches one slot, so sessions, rate limits, rails and shared
knowledge run on a real three-master cluster (a multi-key script or MULTI across slots fails there with CROSSSLOT).
The first test states the layout with `redis.cluster.key_slot`; the rest run the real stores on real nodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from redis.cluster import key_slot

from app.admin.prepare import RedisPrepareChannel
from app.admin.versions import VersionConflict
from app.admin.versions_redis import RedisRailsVersionStore
from app.api.ratelimit import KeyRateLimiter
from app.rag.shared_knowledge import SharedKnowledge
from app.redis_client import redis_client
from app.sessions.base import Turn
from app.sessions.redis import RedisSessionStore
from tests.fixtures.redis_ha import RedisClusterNodes

PREFIX = "guardchat:"
RAILS_PREFIX = f"{PREFIX}{{rails}}:"  # as app/admin/wiring.py builds it
KNOWLEDGE_PREFIX = f"{PREFIX}{{knowledge}}:"  # as app/rag/shared_knowledge.py builds it


def _slots(keys: list[str]) -> set[int]:
    return {key_slot(key.encode()) for key in keys}


def test_every_script_and_transaction_stays_in_one_slot(tmp_path: Path) -> None:
    store = RedisSessionStore("redis+cluster://127.0.0.1:1", ttl_s=60, max_turns=5, key_prefix=PREFIX)
    for session_id in ("a" * 32, "0123456789abcdef0123456789abcdef"):
        session_keys = [store._meta_key(session_id), store._turns_key(session_id), *store._lock_keys(session_id)]
        assert len(_slots(session_keys)) == 1, session_keys  # history, append, open/commit turn, lock scripts
    rails = RedisRailsVersionStore(redis_client("redis+cluster://127.0.0.1:1"), RAILS_PREFIX)
    rails_keys = [rails._live_key, rails._meta_key, rails._files_key(1), rails._files_key(12345)]
    assert len(_slots(rails_keys)) == 1, rails_keys  # the publish script
    knowledge = SharedKnowledge(
        redis_client("redis+cluster://127.0.0.1:1"),
        KNOWLEDGE_PREFIX,
        tmp_path,
        documents=dict,
        apply_changes=lambda paths, ids: None,
        lock=asyncio.Lock(),
    )
    names = ["version", "files", "deleted", "file:uploads/a.md", "file:uploads/other-name.txt"]
    knowledge_keys = [knowledge._key(name) for name in names]
    assert len(_slots(knowledge_keys)) == 1, knowledge_keys  # the MULTI/EXEC of a change, the sync read


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    try:
        nodes = RedisClusterNodes()
    except FileNotFoundError:
        pytest.skip("redis-server is not on PATH")
    with nodes:
        yield nodes


@pytest_asyncio.fixture
async def session_store(cluster: RedisClusterNodes) -> AsyncIterator[RedisSessionStore]:
    store = RedisSessionStore(cluster.url, ttl_s=600, max_turns=3, key_prefix=PREFIX, lock_wait_s=5)
    yield store
    await store.aclose()


pytestmark = pytest.mark.slow


async def test_sessions_on_a_cluster(session_store: RedisSessionStore) -> None:
    await session_store.ping()
    ids = [(await session_store.create(owner="alice")).id for _ in range(6)]  # spread over the masters
    for index, session_id in enumerate(ids):
        async with session_store.open_turn(session_id, last=2, owner="alice", check_owner=True) as turn:
            assert turn.history == []
            await turn.commit(Turn(id=f"t{index}", user=f"hello {index}", answer="hi"))
        await session_store.append(session_id, Turn(id=f"u{index}", user="again", answer="yes"))
        await session_store.set_feedback(session_id, f"t{index}", 1)
        history = await session_store.history(session_id)
        assert [(t.id, t.feedback) for t in history] == [(f"t{index}", 1), (f"u{index}", None)]
        async with session_store.lock(session_id):
            pass
        info = await session_store.get(session_id)
        assert info is not None and info.turn_count == 2
    assert await session_store.delete(ids[0])
    assert await session_store.get(ids[0]) is None


async def test_rate_limit_on_a_cluster(cluster: RedisClusterNodes) -> None:
    limiter = KeyRateLimiter("3/minute", redis_url=cluster.url, key_prefix="guardchat-cluster:")
    try:
        decisions = [await limiter.check(identity) for identity in ("k1", "k1", "k1", "k1", "k2")]
        assert [d.allowed for d in decisions] == [True, True, True, False, True]
        assert limiter.shared  # counted in the cluster, not in memory after a failure
    finally:
        await limiter.aclose()


async def test_rails_publish_and_prepare_on_a_cluster(cluster: RedisClusterNodes) -> None:
    store = RedisRailsVersionStore(redis_client(cluster.url, decode_responses=True), RAILS_PREFIX, owns_client=True)
    try:
        seeded = await store.ensure_seeded({"config.yml": "models: []\n"})
        subscription = await store.subscribe()
        published = await store.publish(seeded.number, {"config.yml": "models: []\n# v2\n"}, "second", "test")
        assert published.number == seeded.number + 1
        with pytest.raises(VersionConflict):
            await store.publish(seeded.number, {"config.yml": "x: 1\n"}, "stale", "test")
        assert (await store.live()).files["config.yml"].endswith("# v2\n")
        assert [v.number for v in await store.list()][:2] == [published.number, seeded.number]
        changes = [await subscription.next_change(timeout_s=2.0) for _ in range(3)]
        assert published.number in changes  # the PUBLISH reached a subscriber on the cluster
        await subscription.close()
        channel = RedisPrepareChannel(store.redis, store.prefix, "replica-a")
        peer = RedisPrepareChannel(store.redis, store.prefix, "replica-b")
        await channel.heartbeat()
        await peer.heartbeat()
        assert await channel.peers() == {"replica-b"}
        sha = await channel.stage({"config.yml": "y: 2\n"})
        assert await peer.staged_files(sha) == {"config.yml": "y: 2\n"}
        await peer.ack(sha, "ok")
        assert await channel.acks(sha) == {"replica-b": "ok"}
    finally:
        await store.close()


async def test_shared_knowledge_on_a_cluster(cluster: RedisClusterNodes, tmp_path: Path) -> None:
    applied: list[tuple[list[Path], list[str]]] = []
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name / "uploads").mkdir(parents=True)
        replicas.append(
            SharedKnowledge(
                redis_client(cluster.url),
                KNOWLEDGE_PREFIX,
                tmp_path / name,
                documents=dict,
                apply_changes=lambda paths, ids: applied.append((list(paths), list(ids))),
                lock=asyncio.Lock(),
                owns_client=True,
            )
        )
    a, b = replicas
    try:
        upload = tmp_path / "a" / "uploads" / "pets.md"
        upload.write_bytes(b"# Pets\n\nThe pet fund pays 7%.")
        version = await a.publish_uploads([upload])
        assert await b.sync()
        assert b.applied_version == version
        assert (tmp_path / "b" / "uploads" / "pets.md").read_bytes() == upload.read_bytes()
        deleted_version = await a.publish_deletion("uploads/pets.md", upload)
        assert deleted_version == version + 1
    finally:
        for replica in replicas:
            await replica.stop()
