"""Both rails version stores: the file store and the Redis store (real Redis, unique key prefix per test)."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.admin.versions import (
    FileRailsVersionStore,
    RailsVersionStore,
    StoreEmpty,
    VersionConflict,
    VersionNotFound,
    files_sha,
)
from tests.admin.helpers import BASE_FILES, open_store, redis_store_pair, with_blocked


@pytest.fixture(params=["file", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RailsVersionStore]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    async with open_store(request.param, redis_url, tmp_path) as opened:
        yield opened


async def test_seed_is_version_one_and_idempotent(store: RailsVersionStore) -> None:
    assert await store.live_number() == 0
    with pytest.raises(StoreEmpty):
        await store.live()
    seeded = await store.ensure_seeded(BASE_FILES)
    assert (seeded.number, seeded.parent, seeded.files, seeded.sha) == (1, 0, BASE_FILES, files_sha(BASE_FILES))
    again = await store.ensure_seeded(with_blocked(["other"]))
    assert again.number == 1 and again.files == BASE_FILES
    assert [v.number for v in await store.list()] == [1]


async def test_publish_get_list_and_stale_base(store: RailsVersionStore) -> None:
    await store.ensure_seeded(BASE_FILES)
    v2 = await store.publish(1, with_blocked(["bomb", "gun"]), "block guns", "alice")
    assert (v2.number, v2.parent, v2.author, v2.message) == (2, 1, "alice", "block guns")
    assert (await store.live()).files == with_blocked(["bomb", "gun"])
    with pytest.raises(VersionConflict) as caught:
        await store.publish(1, with_blocked(["knife"]), "stale", "bob")
    assert (caught.value.base_version, caught.value.live_version) == (1, 2)
    assert await store.live_number() == 2
    listed = await store.list()
    assert [(v.number, v.author) for v in listed] == [(2, "alice"), (1, "seed")]
    assert all(not hasattr(v, "files") for v in listed)
    assert (await store.get(1)).files == BASE_FILES
    with pytest.raises(VersionNotFound):
        await store.get(3)


async def test_concurrent_publishes_on_the_same_base_exactly_one_wins(store: RailsVersionStore) -> None:
    await store.ensure_seeded(BASE_FILES)
    results = await asyncio.gather(
        *(store.publish(1, with_blocked([f"word{i}"]), f"edit {i}", f"admin{i}") for i in range(8)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, VersionConflict) for r in results if r is not winners[0])
    live = await store.live()
    assert live.number == 2 and live.files == winners[0].files
    assert [v.number for v in await store.list()] == [2, 1]


async def test_diff_and_rollback(store: RailsVersionStore) -> None:
    await store.ensure_seeded(BASE_FILES)
    changed = {**with_blocked(["bomb", "gun"]), "flows/new.co": "define flow x\n"}
    del changed["prompts/system.md"]
    await store.publish(1, changed, "edit", "alice")
    diff = await store.diff(1, 2)
    assert "--- v1/blocked_words.txt\n+++ v2/blocked_words.txt\n" in diff
    assert "+gun\n" in diff and " bomb\n" in diff
    assert "--- /dev/null\n+++ v2/flows/new.co\n" in diff
    assert "--- v1/prompts/system.md\n+++ /dev/null\n" in diff and "-You are a bank support assistant.\n" in diff
    assert "config.yml" not in diff
    assert await store.diff(2, 2) == ""

    rolled = await store.rollback(1, "bob")
    assert (rolled.number, rolled.rollback_of, rolled.author, rolled.files) == (3, 1, "bob", BASE_FILES)
    assert rolled.sha == (await store.get(1)).sha
    assert (await store.live()).number == 3
    assert (await store.get(2)).files == changed  # history is never rewritten


async def test_file_store_persists_across_store_objects(tmp_path: Path) -> None:
    first = FileRailsVersionStore(tmp_path / "rails_versions")
    await first.ensure_seeded(BASE_FILES)
    await first.publish(1, with_blocked(["gun"]), "edit", "alice")
    second = FileRailsVersionStore(tmp_path / "rails_versions")
    assert (await second.live()).files == with_blocked(["gun"])
    assert [v.message for v in await second.list()] == ["edit", "Initial version from the rails directory"]
    with pytest.raises(VersionConflict):  # the compare-and-set sees the other object's publish
        await second.publish(1, BASE_FILES, "stale", "bob")
    # A version file beyond LIVE (a publish that crashed before its commit point) is not a version.
    (tmp_path / "rails_versions" / "versions" / "000003.json").write_text("{}")
    assert [v.number for v in await second.list()] == [2, 1]
    with pytest.raises(VersionNotFound):
        await second.get(3)
    assert not [p for p in (tmp_path / "rails_versions" / "versions").iterdir() if p.name.endswith(".tmp")]
    assert await second.subscribe() is None  # no push notifications: followers poll


async def test_redis_store_persists_across_clients(redis_url: str) -> None:
    async with redis_store_pair(redis_url) as (first, second):
        await first.ensure_seeded(BASE_FILES)
        v2 = await first.publish(1, with_blocked(["gun"]), "edit", "alice")
        got = await second.get(2)
        assert (got.files, got.sha, got.created_at) == (v2.files, v2.sha, v2.created_at)
        with pytest.raises(VersionConflict):
            await second.publish(1, BASE_FILES, "stale", "bob")


async def test_redis_publish_is_announced_to_subscribers(redis_url: str) -> None:
    async with redis_store_pair(redis_url) as (first, second):
        await first.ensure_seeded(BASE_FILES)
        subscription = await second.subscribe()
        try:
            assert await subscription.next_change(0.1) is None  # nothing published yet
            await first.publish(1, with_blocked(["gun"]), "edit", "alice")
            assert await subscription.next_change(2.0) == 2
        finally:
            await subscription.close()
        with pytest.raises(VersionConflict):  # a failed publish announces nothing
            await first.publish(1, BASE_FILES, "stale", "bob")
        subscription = await second.subscribe()
        try:
            assert await subscription.next_change(0.3) is None
        finally:
            await subscription.close()
