"""Sessions in Redis, shared by every replica and surviving server restarts.

Layout per session (the `{id}` hash tag keeps a session's keys in one cluster slot, which Lua needs):
    <prefix>session:{<id>}:meta   hash  created_at, owner, turn_count (turns ever appended)
    <prefix>session:{<id>}:turns  list  one JSON document per turn, oldest first, trimmed to max_turns
    <prefix>session:{<id>}:lock   str   token of the turn in progress (+ :queue, :beats, :seq for its waiters)
Both data keys carry the session TTL, refreshed on every load and write. Writes that touch more than
one key run as one Lua script, so a turn is stored whole or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis_async
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.sessions.base import SessionInfo, SessionNotFound, StoreUnavailable, Turn
from app.sessions.memory import DEFAULT_LOCK_WAIT_S, SessionBusy, is_valid_session_id

__all__ = ["RedisSessionStore", "SessionBusy", "redact_url"]

logger = logging.getLogger(__name__)

# KEYS: meta, turns. ARGV: ttl_ms, first index (0, or -N for the last N). Returns nil for an unknown session,
# else the turns (oldest first).
_HISTORY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('LRANGE', KEYS[2], ARGV[2], -1)
"""

# KEYS: meta, turns. ARGV: turn json, max_turns, ttl_ms. Returns -1 for an unknown session, else turn_count.
# Idempotent: when the client re-sends after a connection dropped before the reply, the turn is not doubled.
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('LINDEX', KEYS[2], -1) == ARGV[1] then return tonumber(redis.call('HGET', KEYS[1], 'turn_count')) end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
local turn_count = redis.call('HINCRBY', KEYS[1], 'turn_count', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return turn_count
"""

# KEYS: meta, turns. ARGV: turn id, substring prefilter ('' = none), feedback json, ttl_ms.
# Returns -1 unknown session, 0 unknown turn, 1 updated, -2 stored turn not in our encoding.
# The turn is patched as a string instead of decode/encode with cjson, which would round floats
# (created_at) and turn empty JSON arrays into objects. `_encode_turn` guarantees "feedback" comes last.
_SET_FEEDBACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local turns = redis.call('LRANGE', KEYS[2], 0, -1)
for index, raw in ipairs(turns) do
  if string.find(raw, ARGV[2], 1, true) then
    local ok, turn = pcall(cjson.decode, raw)
    if ok and turn['id'] == ARGV[1] then
      local patched, replaced = string.gsub(raw, ',"feedback":[%-%w]*}$', ',"feedback":' .. ARGV[3] .. '}')
      if replaced ~= 1 then return -2 end
      redis.call('LSET', KEYS[2], index - 1, patched)
      redis.call('PEXPIRE', KEYS[1], ARGV[4])
      redis.call('PEXPIRE', KEYS[2], ARGV[4])
      return 1
    end
  end
end
return 0
"""

# A fair (FIFO) lock. KEYS: lock, queue (zset token -> arrival number), beats (zset token -> deadline ms),
# arrival counter. ARGV: token, lock_ttl_ms, waiter_ttl_ms. Each poll enqueues the caller once, refreshes its
# heartbeat, drops waiters whose heartbeat ran out, and takes the lock only for the head of the queue.
# Returns 1 when the caller now holds the lock.
_LOCK_ACQUIRE_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for _, waiter in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], waiter)
  redis.call('ZREM', KEYS[3], waiter)
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
if redis.call('ZRANGE', KEYS[2], 0, 0)[1] == ARGV[1] and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

# KEYS: lock. ARGV: token, lock_ttl_ms. Returns 1 while the caller still holds the lock.
_LOCK_RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lock, queue, beats. ARGV: token. Leaves the queue and releases the lock if the caller holds it.
_LOCK_RELEASE_LUA = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable redis url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _encode_turn(turn: Turn) -> str:
    # "feedback" is written last on purpose: _SET_FEEDBACK_LUA rewrites it in place.
    body = turn.model_dump_json(exclude={"feedback"})
    return f'{body[:-1]},"feedback":{json.dumps(turn.feedback)}}}'


class RedisSessionStore:
    """`SessionStore` on Redis (redis-py asyncio). Every Redis failure surfaces as `StoreUnavailable`.

    The client fails fast when Redis is down (short socket timeouts, one immediate reconnect attempt) and
    recovers on its own: a broken pooled connection is dropped and the next call reconnects.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        max_turns: int,
        key_prefix: str = "guardchat:",
        lock_ttl_s: float = 30.0,
        lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
        lock_poll_s: float = 0.05,
        lock_waiter_ttl_s: float = 3.0,
        socket_timeout_s: float = 1.0,
        health_check_interval_s: int = 10,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        if lock_ttl_s <= 0:
            raise ValueError("lock_ttl_s must be positive")
        self._safe_url = redact_url(url)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._max_turns = max_turns
        self._prefix = key_prefix
        self._lock_ttl_s = lock_ttl_s
        self._lock_ttl_ms = max(1, int(lock_ttl_s * 1000))
        self._lock_wait_s = lock_wait_s
        self._lock_poll_s = lock_poll_s
        self._lock_waiter_ttl_ms = max(1, int(max(lock_waiter_ttl_s, 10 * lock_poll_s) * 1000))
        self._client: redis_async.Redis = redis_async.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # Retry once, at once, and only on connection errors: that transparently replaces a pooled
            # connection Redis closed (restart, idle timeout) without stretching an outage into seconds.
            retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
            health_check_interval=health_check_interval_s,
        )
        self._history_script = self._client.register_script(_HISTORY_LUA)
        self._append_script = self._client.register_script(_APPEND_LUA)
        self._feedback_script = self._client.register_script(_SET_FEEDBACK_LUA)
        self._lock_acquire_script = self._client.register_script(_LOCK_ACQUIRE_LUA)
        self._lock_renew_script = self._client.register_script(_LOCK_RENEW_LUA)
        self._lock_release_script = self._client.register_script(_LOCK_RELEASE_LUA)

    # ---- keys -------------------------------------------------------------------------------------
    def _meta_key(self, session_id: str) -> str:
        return f"{self._prefix}session:{{{session_id}}}:meta"

    def _turns_key(self, session_id: str) -> str:
        return f"{self._prefix}session:{{{session_id}}}:turns"

    def _lock_key(self, session_id: str) -> str:
        return f"{self._prefix}session:{{{session_id}}}:lock"

    @contextlib.contextmanager
    def _redis_errors(self, operation: str) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            # redis-py messages name host and port, never the password; the URL is redacted.
            raise StoreUnavailable(
                f"session store unavailable: {operation} on {self._safe_url} failed ({type(exc).__name__}: {exc})"
            ) from exc

    # ---- SessionStore -----------------------------------------------------------------------------
    async def create(self, owner: str | None = None) -> SessionInfo:
        info = SessionInfo(id=uuid.uuid4().hex, created_at=time.time(), owner=owner)
        fields: dict[str, str | int] = {"created_at": repr(info.created_at), "turn_count": 0}
        if owner is not None:
            fields["owner"] = owner
        meta_key = self._meta_key(info.id)
        with self._redis_errors("create"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(meta_key, mapping=fields)  # type: ignore[arg-type]
                pipe.pexpire(meta_key, self._ttl_ms)
                await pipe.execute()
        return info

    async def get(self, session_id: str) -> SessionInfo | None:
        if not is_valid_session_id(session_id):
            return None
        with self._redis_errors("get"):
            # decode_responses=True: keys and values are str.
            fields = cast(dict[str, str], await self._client.hgetall(self._meta_key(session_id)))
        if not fields:
            return None
        return SessionInfo(
            id=session_id,
            created_at=float(fields["created_at"]),
            owner=fields.get("owner"),
            turn_count=int(fields.get("turn_count", 0)),
        )

    async def history(self, session_id: str, last: int | None = None) -> list[Turn]:
        if not is_valid_session_id(session_id):
            raise SessionNotFound(session_id)
        # LRANGE's first index: all turns, the last N, or past the end (none, but the session is still checked).
        first = 0 if last is None else -last if last > 0 else 1 << 40
        with self._redis_errors("history"):
            raw_turns = await self._history_script(
                keys=[self._meta_key(session_id), self._turns_key(session_id)], args=[self._ttl_ms, first]
            )
        if raw_turns is None:
            raise SessionNotFound(session_id)
        turns: list[Turn] = []
        for raw in raw_turns:
            try:
                turns.append(Turn.model_validate_json(raw))
            except ValueError:
                # One bad entry must not make the whole conversation unreadable.
                logger.warning("skipping an unreadable stored turn in session %s", session_id)
        return turns

    async def append(self, session_id: str, turn: Turn) -> None:
        if not is_valid_session_id(session_id):
            raise SessionNotFound(session_id)
        with self._redis_errors("append"):
            turn_count = await self._append_script(
                keys=[self._meta_key(session_id), self._turns_key(session_id)],
                args=[_encode_turn(turn), self._max_turns, self._ttl_ms],
            )
        if int(turn_count) < 0:
            raise SessionNotFound(session_id)

    async def set_feedback(self, session_id: str, turn_id: str, value: int) -> None:
        if not is_valid_session_id(session_id):
            raise SessionNotFound(session_id)
        # Plain substring prefilter so Lua decodes only the candidate turn; ids outside the simple
        # alphabet may be escaped in JSON, so for them every turn is decoded ('' matches everything).
        prefilter = turn_id if is_valid_session_id(turn_id) else ""
        with self._redis_errors("set_feedback"):
            outcome = int(
                await self._feedback_script(
                    keys=[self._meta_key(session_id), self._turns_key(session_id)],
                    args=[turn_id, prefilter, json.dumps(int(value)), self._ttl_ms],
                )
            )
        if outcome == -1:
            raise SessionNotFound(session_id)
        if outcome == 0:
            raise SessionNotFound(f"turn {turn_id} in session {session_id}")
        if outcome == -2:
            raise StoreUnavailable(f"stored turn {turn_id} of session {session_id} has an unexpected encoding")

    async def delete(self, session_id: str) -> bool:
        if not is_valid_session_id(session_id):
            return False
        with self._redis_errors("delete"):
            # The lock key is left alone: a turn in progress still owns it and releases it itself.
            deleted = await self._client.delete(self._meta_key(session_id), self._turns_key(session_id))
        return int(deleted) > 0

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._turn_lock(session_id)

    async def ping(self) -> None:
        with self._redis_errors("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # ---- lock -------------------------------------------------------------------------------------
    @asynccontextmanager
    async def _turn_lock(self, session_id: str) -> AsyncIterator[None]:
        """Hold the session's fair Redis lock for the body; renew it while held so long turns keep it.

        Waiters queue in Redis in arrival order, whichever replica they are on. The lock expires `lock_ttl_s`
        after its holder stops renewing (crash, lost network) and a waiter that stops polling leaves the queue
        after `lock_waiter_ttl_s`, so a dead replica cannot block a session for long. Waiting longer than
        `lock_wait_s` raises SessionBusy.
        """
        keys = self._lock_keys(session_id)
        token = uuid.uuid4().hex
        await self._acquire(session_id, keys, token)
        renewer = asyncio.create_task(self._keep_renewing(session_id, keys, token))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._let_go(session_id, keys, token)

    def _lock_keys(self, session_id: str) -> list[str]:
        lock_key = self._lock_key(session_id)
        return [lock_key, f"{lock_key}:queue", f"{lock_key}:beats", f"{lock_key}:seq"]

    async def _acquire(self, session_id: str, keys: list[str], token: str) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._lock_wait_s
        acquired = False
        try:
            while True:
                with self._redis_errors("lock"):
                    acquired = bool(
                        await self._lock_acquire_script(
                            keys=keys, args=[token, self._lock_ttl_ms, self._lock_waiter_ttl_ms]
                        )
                    )
                if acquired:
                    return
                if loop.time() + self._lock_poll_s > give_up_at:
                    raise SessionBusy(
                        f"session {session_id} is busy with another turn (waited {self._lock_wait_s:g}s)"
                    )
                await asyncio.sleep(self._lock_poll_s)
        finally:
            if not acquired:
                # Given up, cancelled or Redis failed: leave the queue now instead of holding up the turns
                # behind us until our heartbeat runs out (also drops the lock if a cancelled call got it).
                await self._let_go(session_id, keys, token)

    async def _keep_renewing(self, session_id: str, keys: list[str], token: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ttl_s / 3)
            try:
                still_ours = await self._lock_renew_script(keys=keys[:1], args=[token, self._lock_ttl_ms])
            except (RedisError, OSError) as exc:
                # Keep trying: Redis may come back before the lock would have expired.
                logger.warning("could not renew the turn lock of session %s: %s", session_id, type(exc).__name__)
                continue
            if not still_ours:
                logger.warning("lost the turn lock of session %s (it expired); the turn continues", session_id)
                return

    async def _let_go(self, session_id: str, keys: list[str], token: str) -> None:
        # Never raises: it would hide the turn's own outcome, and an unreleased lock expires by itself.
        try:
            await self._lock_release_script(keys=keys, args=[token])
        except (RedisError, OSError) as exc:
            logger.warning("could not release the turn lock of session %s: %s", session_id, type(exc).__name__)
