from __future__ import annotations

from app.sessions.base import Turn
from app.sessions.factory import build_session_store
from app.sessions.memory import MemorySessionStore
from app.sessions.redis import RedisSessionStore
from app.settings import Settings


async def test_memory_store_without_redis_url() -> None:
    store = build_session_store(Settings(redis_url=None, session_max_turns=2))
    assert isinstance(store, MemorySessionStore)
    session = await store.create()
    for n in range(3):
        await store.append(session.id, _turn(n))
    assert [t.user for t in await store.history(session.id)] == ["q1", "q2"]


async def test_redis_store_with_redis_url(redis_url: str) -> None:
    store = build_session_store(Settings(redis_url=redis_url, session_ttl_s=123))
    try:
        assert isinstance(store, RedisSessionStore)
        await store.ping()
        session = await store.create()
        try:
            assert await store.get(session.id) == session
        finally:
            await store.delete(session.id)
    finally:
        await store.aclose()


def _turn(n: int) -> Turn:
    return Turn(user=f"q{n}", answer=f"a{n}")
