from __future__ import annotations

import time

from app.sessions.base import Turn
from app.sessions.factory import PROBE_TIMEOUT_S, build_session_store, choose_redis_url
from app.sessions.memory import MemorySessionStore
from app.sessions.redis import RedisSessionStore
from app.settings import Settings
from tests.fixtures.server import free_port


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


# --- GUARDCHAT_REDIS_URL=auto (what `make run` asks for) ------------------------------------------------------


async def test_auto_takes_redis_when_it_answers(redis_url: str) -> None:
    choice = choose_redis_url("auto", probe_url=redis_url)
    assert choice.redis_url == redis_url
    assert choice.note.startswith(f"session store: Redis at {redis_url}")
    store = build_session_store(Settings(redis_url=choice.redis_url))
    try:
        assert isinstance(store, RedisSessionStore)
        await store.ping()  # raises when the store cannot reach Redis
    finally:
        await store.aclose()


def test_auto_falls_back_to_memory_when_no_redis_answers() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # a closed port on loopback: refused at once
    started = time.monotonic()
    choice = choose_redis_url(" AUTO ", probe_url=nobody)
    assert time.monotonic() - started < 2 * PROBE_TIMEOUT_S
    assert choice.redis_url is None
    assert choice.note.startswith(f"session store: in-process memory (auto: no Redis at {nobody}: ConnectionError)")
    assert isinstance(build_session_store(Settings(redis_url=choice.redis_url)), MemorySessionStore)


def test_a_configured_url_is_kept_and_logged_without_its_password() -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/3"
    choice = choose_redis_url(url)  # not probed: a configured Redis that is down fails readiness instead
    assert choice.redis_url == url
    assert "hunter2" not in choice.note and "***" in choice.note
    auto = choose_redis_url("auto", probe_url=url)
    assert auto.redis_url is None and "hunter2" not in auto.note
    unset = choose_redis_url(None)
    assert unset.redis_url is None and "in-process memory" in unset.note
