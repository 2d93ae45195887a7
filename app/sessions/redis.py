"""Sessions in Redis, shared by every replica and surviving server restarts.

Layout per session (the `{id}` hash tag keeps a session's keys in one cluster slot, which Lua needs):
    <prefix>session:{<id>}:meta   hash  created_at, owner, turn_count (turns ever appended)
    <prefix>session:{<id>}:turns  list  one JSON document per turn, oldest first, trimmed to max_turns
    <prefix>session:{<id>}:lock   str   token of the turn in progress (+ :queue, :beats, :seq for its waiters)
Both data keys carry the session TTL, refreshed on every load and write. Writes that touch more than
one key run as one Lua script, so a turn is stored whole or not at all.

Failover (Sentinel): with `replica_acks` (1 by default with a redis+sentinel:// URL) a new session and a turn are
answered only once that many replicas have them (WAIT, on the connection that wrote), so promoting a replica
cannot lose an answered turn. When fewer acknowledge in time the sentinels are asked: if the server written to is
still the primary (a replica is down or slow) the write stands; if not, it went to a primary that was just
replaced and will be discarded with it, so the call fails (StoreUnavailable, a 503) and nothing is kept. A turn
re-sent after a dropped connection is not stored twice (APPEND_FUNCTION compares the last stored turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.redis_client import is_current_primary, parse_redis_url, redis_client
from app.sessions import redis_scripts as scripts
from app.sessions.base import (
    DEFAULT_LOCK_WAIT_S,
    OpenTurn,
    SessionBusy,
    SessionInfo,
    SessionNotFound,
    StoreUnavailable,
    Turn,
    is_valid_session_id,
)

__all__ = ["RedisSessionStore", "SessionBusy", "redact_url"]

logger = logging.getLogger(__name__)


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


def _first_index(last: int | None) -> int:
    """LRANGE's first index: all turns, the last N, or past the end (none, but the session is still checked)."""
    return 0 if last is None else -last if last > 0 else 1 << 40


def _decode_turns(session_id: str, raw_turns: list[str]) -> list[Turn]:
    turns: list[Turn] = []
    for raw in raw_turns:
        try:
            turns.append(Turn.model_validate_json(raw))
        except ValueError:
            # One bad entry must not make the whole conversation unreadable.
            logger.warning("skipping an unreadable stored turn in session %s", session_id)
    return turns


class _RedisHeldTurn:
    """`OpenTurn` of the Redis store: `commit` appends the turn and releases the lock in one script."""

    def __init__(
        self,
        store: RedisSessionStore,
        session_id: str,
        keys: list[str],
        token: str,
        history: list[Turn],
        stop_renewing: Callable[[], Awaitable[None]],
    ) -> None:
        self.store, self.session_id, self.keys, self.token, self.history = store, session_id, keys, token, history
        self.stop_renewing = stop_renewing
        self.committed = False

    async def commit(self, turn: Turn) -> None:
        await self.stop_renewing()  # first: a renewal after the release would report a lost lock
        await self.store._commit(self, turn)


def _encode_turn(turn: Turn) -> str:
    # "feedback" is written last on purpose: scripts.SET_FEEDBACK_LUA rewrites it in place.
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
        replica_acks: int | None = None,
        replica_ack_timeout_ms: int = 250,
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
        if replica_acks is None:
            replica_acks = 1 if parse_redis_url(url).kind == "sentinel" else 0
        self._replica_acks = max(0, replica_acks)
        self._replica_ack_timeout_ms = max(1, replica_ack_timeout_ms)
        self._client = redis_client(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # Retry once, at once, and only on connection errors: that transparently replaces a pooled
            # connection Redis closed (restart, idle timeout) without stretching an outage into seconds.
            retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
            health_check_interval=health_check_interval_s,
        )
        if isinstance(self._client, RedisCluster) and self._replica_acks:
            # A cluster pipeline may send WAIT to another node than the write; cluster failover is Redis's own.
            logger.warning("redis: replica_acks is ignored with a Redis Cluster URL")
            self._replica_acks = 0
        self._create_script = self._client.register_script(scripts.CREATE_LUA)
        self._history_script = self._client.register_script(scripts.HISTORY_LUA)
        self._append_script = self._client.register_script(scripts.APPEND_LUA)
        self._feedback_script = self._client.register_script(scripts.SET_FEEDBACK_LUA)
        self._lock_acquire_script = self._client.register_script(scripts.LOCK_ACQUIRE_LUA)
        self._lock_renew_script = self._client.register_script(scripts.LOCK_RENEW_LUA)
        self._lock_release_script = self._client.register_script(scripts.LOCK_RELEASE_LUA)
        self._open_turn_script = self._client.register_script(scripts.OPEN_TURN_LUA)
        self._commit_turn_script = self._client.register_script(scripts.COMMIT_TURN_LUA)

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
        pairs = [item for name, value in fields.items() for item in (name, value)]
        with self._redis_errors("create"):
            await self._write(self._create_script, [self._meta_key(info.id)], [self._ttl_ms, *pairs])
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
        with self._redis_errors("history"):
            raw_turns = await self._history_script(
                keys=[self._meta_key(session_id), self._turns_key(session_id)], args=[self._ttl_ms, _first_index(last)]
            )
        if raw_turns is None:
            raise SessionNotFound(session_id)
        return _decode_turns(session_id, raw_turns)

    async def append(self, session_id: str, turn: Turn) -> None:
        if not is_valid_session_id(session_id):
            raise SessionNotFound(session_id)
        with self._redis_errors("append"):
            turn_count = await self._write(
                self._append_script,
                [self._meta_key(session_id), self._turns_key(session_id)],
                [_encode_turn(turn), self._max_turns, self._ttl_ms],
            )
        if int(turn_count) < 0:
            raise SessionNotFound(session_id)

    def open_turn(
        self, session_id: str, *, last: int, owner: str | None = None, check_owner: bool = False
    ) -> AbstractAsyncContextManager[OpenTurn]:
        return self._open_turn(session_id, last, owner, check_owner)

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
        await self._acquire(session_id, keys, token, self._lock_acquire_script)
        try:
            async with self._renewing(session_id, keys, token):
                yield
        finally:
            await self._let_go(session_id, keys, token)

    @asynccontextmanager
    async def _open_turn(
        self, session_id: str, last: int, owner: str | None, check_owner: bool
    ) -> AsyncIterator[OpenTurn]:
        """`_turn_lock` whose every poll also checks the session (and its owner) and, once the lock is taken,
        reads the history: a turn's start is one round trip when nobody else holds the session."""
        if not is_valid_session_id(session_id):
            raise SessionNotFound(session_id)
        keys = self._lock_keys(session_id)
        token = uuid.uuid4().hex
        session_keys = [self._meta_key(session_id), self._turns_key(session_id)]
        extra = [self._ttl_ms, _first_index(last), owner or "", "1" if check_owner else "0"]
        raw_turns = await self._acquire(session_id, keys, token, self._open_turn_script, extra, session_keys)
        history = _decode_turns(session_id, raw_turns)
        held: _RedisHeldTurn | None = None
        try:
            async with self._renewing(session_id, keys, token) as stop_renewing:
                held = _RedisHeldTurn(self, session_id, keys, token, history, stop_renewing)
                yield held
        finally:
            if held is None or not held.committed:
                await self._let_go(session_id, keys, token)

    async def _commit(self, held: _RedisHeldTurn, turn: Turn) -> None:
        session_id = held.session_id
        with self._redis_errors("append"):
            turn_count = await self._write(
                self._commit_turn_script,
                [self._meta_key(session_id), self._turns_key(session_id), *held.keys[:3]],
                [_encode_turn(turn), self._max_turns, self._ttl_ms, held.token],
            )
        held.committed = True  # the script released the lock, whatever it returned
        if int(turn_count) < 0:
            raise SessionNotFound(session_id)

    async def _write(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Runs a write script; with replica_acks, waits on the same connection until replicas have it."""
        if not self._replica_acks:
            return await script(keys=keys, args=args)
        # Never a cluster pipeline: replica_acks is 0 with a cluster URL.
        async with cast(Pipeline, self._client.pipeline(transaction=False)) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self._replica_acks, self._replica_ack_timeout_ms)
            await pipe.load_scripts()  # also takes the connection the pipeline will write on
            connection = cast(Connection, pipe.connection)
            address = (connection.host, connection.port)
            reply, acks = await pipe.execute()
        if int(acks) < self._replica_acks and await is_current_primary(self._client, address) is False:
            raise RedisConnectionError(
                f"the write reached {address[0]}:{address[1]}, which is no longer the primary (failover)"
            )
        return reply

    def _lock_keys(self, session_id: str) -> list[str]:
        lock_key = self._lock_key(session_id)
        return [lock_key, f"{lock_key}:queue", f"{lock_key}:beats", f"{lock_key}:seq"]

    async def _acquire(
        self,
        session_id: str,
        keys: list[str],
        token: str,
        script: Any,
        extra_args: tuple[Any, ...] | list[Any] = (),
        extra_keys: tuple[str, ...] | list[str] = (),
    ) -> Any:
        """Polls `script` (the lock, or the lock plus the session read) until it takes the lock; returns the
        reply's payload. A reply of -1 means the session is unknown (SessionNotFound), 0 that the lock is busy."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._lock_wait_s
        args = [token, self._lock_ttl_ms, self._lock_waiter_ttl_ms, *extra_args]
        acquired = False
        try:
            while True:
                with self._redis_errors("lock"):
                    reply = await script(keys=[*keys, *extra_keys], args=args)
                if reply == -1:
                    raise SessionNotFound(session_id)
                if reply != 0:
                    acquired = True
                    return reply[1] if isinstance(reply, list) else reply
                if loop.time() + self._lock_poll_s > give_up_at:
                    raise SessionBusy(f"session {session_id} is busy with another turn (waited {self._lock_wait_s:g}s)")
                await asyncio.sleep(self._lock_poll_s)
        finally:
            if not acquired:
                # Given up, cancelled or Redis failed: leave the queue now instead of holding up the turns
                # behind us until our heartbeat runs out (also drops the lock if a cancelled call got it).
                await self._let_go(session_id, keys, token)

    @asynccontextmanager
    async def _renewing(
        self, session_id: str, keys: list[str], token: str
    ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Renews the held lock in the background for the block; yields a function that stops that early."""
        renewer = asyncio.create_task(self._keep_renewing(session_id, keys, token))

        async def stop() -> None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

        try:
            yield stop
        finally:
            await stop()

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
