"""Pick the session store from settings: Redis when `redis_url` is set, else in-process memory."""

from __future__ import annotations

from app.sessions.base import SessionStore
from app.sessions.memory import DEFAULT_LOCK_WAIT_S, MemorySessionStore
from app.sessions.redis import RedisSessionStore
from app.settings import Settings


def build_session_store(settings: Settings) -> SessionStore:
    # Optional knobs not (yet) in Settings; getattr keeps this working before they are added.
    lock_wait_s = float(getattr(settings, "session_lock_wait_s", DEFAULT_LOCK_WAIT_S))
    if settings.redis_url:
        return RedisSessionStore(
            settings.redis_url,
            ttl_s=settings.session_ttl_s,
            max_turns=settings.session_max_turns,
            key_prefix=str(getattr(settings, "redis_key_prefix", "guardchat:")),
            lock_ttl_s=float(getattr(settings, "session_lock_ttl_s", 30.0)),
            lock_wait_s=lock_wait_s,
        )
    return MemorySessionStore(
        ttl_s=settings.session_ttl_s, max_turns=settings.session_max_turns, lock_wait_s=lock_wait_s
    )
