"""`build_rails_publisher` (what the app lifespan calls): store choice, seeding from rails_dir, state wiring."""

import uuid
from pathlib import Path

from app.admin.publisher import RailsPublisher
from app.admin.versions import FileRailsVersionStore
from app.admin.versions_redis import RedisRailsVersionStore
from app.admin.wiring import build_rails_publisher, open_version_store
from app.settings import Settings
from app.state import AppState
from tests.admin.helpers import BASE_FILES, initial_live
from tests.fixtures.redis import delete_keys_with_prefix


def app_state(settings: Settings) -> AppState:
    return AppState(
        settings=settings,
        llm=None,  # type: ignore[arg-type]  # only used to build guards, which these tests never need
        store=None,  # type: ignore[arg-type]
        embedder=None,  # type: ignore[arg-type]
        retriever=None,
        rails=initial_live(version="local"),
    )


def rails_dir(tmp_path: Path) -> Path:
    root = tmp_path / "rails"
    for path, text in BASE_FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    (root / "notes.py").write_text("not a rails file\n")
    return root


async def test_file_store_when_no_redis(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, data_dir=tmp_path / "data", rails_dir=rails_dir(tmp_path))
    state = app_state(settings)
    disk_guard = state.rails.current.guard
    publisher = await build_rails_publisher(state)
    try:
        assert isinstance(publisher.store, FileRailsVersionStore)
        assert state.rails_publisher is publisher
        live = await publisher.store.live()
        assert (live.number, live.author, live.files) == (1, "seed", BASE_FILES)
        # The lifespan's guard already runs the seeded content: it is kept, not rebuilt.
        assert state.rails.current.version == "1" and state.rails.current.guard is disk_guard
        assert (tmp_path / "data" / "rails_versions" / "LIVE").read_text().strip() == "1"
    finally:
        await publisher.stop()


async def test_redis_store_shared_by_replicas(tmp_path: Path, redis_url: str) -> None:
    prefix = f"guardchat-test:{uuid.uuid4().hex[:12]}:"
    settings = Settings(redis_url=redis_url, redis_key_prefix=prefix, rails_dir=rails_dir(tmp_path))
    publishers: list[RailsPublisher] = []
    try:
        for _ in range(2):  # two replicas starting on the same Redis: one seed
            state = app_state(settings)
            publishers.append(await build_rails_publisher(state))
            assert state.rails.current.version == "1"
        assert isinstance(publishers[0].store, RedisRailsVersionStore)
        assert publishers[0].store.prefix == f"{prefix}{{rails}}:"
        assert [v.number for v in await publishers[1].store.list()] == [1]
    finally:
        for publisher in publishers:
            await publisher.stop()
        delete_keys_with_prefix(redis_url, prefix)


def test_open_version_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_version_store(Settings(redis_url=None, data_dir=tmp_path)), FileRailsVersionStore)
