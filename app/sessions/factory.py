"""Pick the session store from settings: Redis when `redis_url` is set, else in-process memory.

`redis_url="auto"` (what `make run` asks for) is settled first, by `choose_redis_url`: the local Redis when it
answers, else the in-process store. create_app does that once, before anything reads the URL (the session
store, the rate limiter and the rails versions all follow the same choice).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import RedisError

from app.redis_client import redis_client
from app.sessions.base import SessionStore
from app.sessions.memory import MemorySessionStore
from app.sessions.redis import RedisSessionStore, redact_url
from app.settings import Settings

AUTO = "auto"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
# A Redis on loopback answers PING in well under a millisecond; a closed port refuses at once. The timeout only
# bounds a port that accepts and never answers, so the server starts at most this much later.
PROBE_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class StoreChoice:
    redis_url: str | None  # what `settings.redis_url` becomes: a URL, or None for the in-process store
    note: str  # the log line saying which store the server uses (no password in it)


def choose_redis_url(configured: str | None, *, probe_url: str = LOCAL_REDIS_URL) -> StoreChoice:
    """Settles the configured `redis_url`: "auto" becomes `probe_url` when a Redis there answers PING, else
    None; any other value is kept (a configured Redis that is down must fail readiness, not silently lose
    sessions to memory)."""
    if configured and configured.strip().lower() == AUTO:
        failure = _ping(probe_url)
        if failure is None:
            return StoreChoice(probe_url, f"session store: Redis at {redact_url(probe_url)} (auto: it answered)")
        return StoreChoice(
            None,
            f"session store: in-process memory (auto: no Redis at {redact_url(probe_url)}: {failure}); "
            "sessions end with the process",
        )
    if configured:
        return StoreChoice(configured, f"session store: Redis at {redact_url(configured)}")
    return StoreChoice(
        None, "session store: in-process memory (GUARDCHAT_REDIS_URL unset); sessions end with the process"
    )


def _ping(url: str) -> str | None:
    """None when the Redis at `url` answers PING, else the reason (the exception's type: its text may hold the
    URL, password included)."""
    try:
        client = redis_client(url, async_=False, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S)
    except ValueError as exc:
        return type(exc).__name__
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        return type(exc).__name__
    finally:
        client.close()
    return None


def build_session_store(settings: Settings) -> SessionStore:
    # Optional knobs not (yet) in Settings; getattr keeps this working before they are added.
    lock_wait_s = settings.session_lock_wait_s
    if settings.redis_url:
        return RedisSessionStore(
            settings.redis_url,
            ttl_s=settings.session_ttl_s,
            max_turns=settings.session_max_turns,
            key_prefix=settings.redis_key_prefix,
            lock_ttl_s=settings.session_lock_ttl_s,
            lock_wait_s=lock_wait_s,
            replica_acks=settings.redis_replica_acks,
            replica_ack_timeout_ms=settings.redis_replica_ack_timeout_ms,
        )
    return MemorySessionStore(
        ttl_s=settings.session_ttl_s, max_turns=settings.session_max_turns, lock_wait_s=lock_wait_s
    )
