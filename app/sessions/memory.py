"""In-process session store for development and single-replica runs (no Redis configured).

Same semantics as `RedisSessionStore`: TTL refreshed on every use, oldest turns trimmed beyond
`max_turns`, turns of one session serialized by `lock()`. State lives in this process only, so
it is lost on restart and not shared between replicas.

Also home of the small pieces both stores share (`SessionBusy`, `KeyedLocks`, session id rules);
they live here because this module has no third-party dependencies.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from app.sessions.base import (
    DEFAULT_LOCK_WAIT_S,
    OpenTurn,
    SessionBusy,
    SessionInfo,
    SessionNotFound,
    Turn,
)


@dataclass
class _KeyedLockEntry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders + waiters; the entry is dropped when it reaches 0


class KeyedLocks:
    """One FIFO `asyncio.Lock` per key, created on demand and dropped when nobody holds or waits for it.

    asyncio.Lock wakes waiters in arrival order, so turns of one session run in the order they arrived.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _KeyedLockEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, key: str, *, timeout_s: float | None) -> AsyncIterator[None]:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _KeyedLockEntry()
        entry.users += 1
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    await entry.lock.acquire()
            except TimeoutError:
                raise SessionBusy(f"session {key} is busy with another turn (waited {timeout_s:g}s)") from None
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0 and self._entries.get(key) is entry:
                del self._entries[key]


@dataclass
class _StoredSession:
    info: SessionInfo
    turns: deque[Turn]
    expires_at: float  # time.monotonic() deadline


class MemorySessionStore:
    """`SessionStore` kept in a dict. TTLs use the monotonic clock and are checked lazily."""

    def __init__(self, *, ttl_s: float, max_turns: int, lock_wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        self._ttl_s = ttl_s
        self._max_turns = max_turns
        self._lock_wait_s = lock_wait_s
        self._sessions: dict[str, _StoredSession] = {}
        self._locks = KeyedLocks()
        self._next_sweep_at = time.monotonic() + self._sweep_interval_s

    @property
    def _sweep_interval_s(self) -> float:
        return min(self._ttl_s, 60.0)

    def _sweep_expired(self) -> None:
        """Drop expired sessions nobody asks about any more, so memory does not grow without bound."""
        now = time.monotonic()
        if now < self._next_sweep_at:
            return
        self._next_sweep_at = now + self._sweep_interval_s
        for session_id in [sid for sid, stored in self._sessions.items() if stored.expires_at <= now]:
            del self._sessions[session_id]

    def _live(self, session_id: str) -> _StoredSession | None:
        stored = self._sessions.get(session_id)
        if stored is None:
            return None
        if stored.expires_at <= time.monotonic():
            del self._sessions[session_id]
            return None
        return stored

    def _live_or_raise(self, session_id: str) -> _StoredSession:
        stored = self._live(session_id)
        if stored is None:
            raise SessionNotFound(session_id)
        return stored

    def _touch(self, stored: _StoredSession) -> None:
        stored.expires_at = time.monotonic() + self._ttl_s

    async def create(self, owner: str | None = None) -> SessionInfo:
        self._sweep_expired()
        info = SessionInfo(id=_new_session_id(), created_at=time.time(), owner=owner)
        self._sessions[info.id] = _StoredSession(
            info=info, turns=deque(maxlen=self._max_turns), expires_at=time.monotonic() + self._ttl_s
        )
        return info.model_copy()

    async def get(self, session_id: str) -> SessionInfo | None:
        stored = self._live(session_id)
        return None if stored is None else stored.info.model_copy()

    async def history(self, session_id: str, last: int | None = None) -> list[Turn]:
        stored = self._live_or_raise(session_id)
        self._touch(stored)
        turns = list(stored.turns)
        if last is not None:
            turns = turns[-last:] if last > 0 else []
        # Deep copies: callers must not be able to change stored turns (e.g. their metadata dicts).
        return [turn.model_copy(deep=True) for turn in turns]

    async def append(self, session_id: str, turn: Turn) -> None:
        stored = self._live_or_raise(session_id)
        self._touch(stored)
        if stored.turns and stored.turns[-1] == turn:
            return  # the same turn again (a retried write) is stored once, as in RedisSessionStore
        stored.turns.append(turn.model_copy(deep=True))  # the deque's maxlen trims the oldest turn
        stored.info.turn_count += 1

    async def set_feedback(self, session_id: str, turn_id: str, value: int) -> None:
        stored = self._live_or_raise(session_id)
        for turn in stored.turns:
            if turn.id == turn_id:
                turn.feedback = value
                self._touch(stored)
                return
        raise SessionNotFound(f"turn {turn_id} in session {session_id}")

    async def delete(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(session_id, timeout_s=self._lock_wait_s)

    @asynccontextmanager
    async def open_turn(
        self, session_id: str, *, last: int, owner: str | None = None, check_owner: bool = False
    ) -> AsyncIterator[OpenTurn]:
        stored = self._live(session_id)
        if stored is None or (check_owner and stored.info.owner != owner):
            raise SessionNotFound(session_id)
        async with AsyncExitStack() as taking:
            await taking.enter_async_context(self.lock(session_id))
            history = await self.history(session_id, last=last)  # may still raise: then the lock is let go here
            held = _HeldTurn(self, session_id, history, taking.pop_all())
        try:
            yield held
        finally:
            await held.release()

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class _HeldTurn:
    """`OpenTurn` of the in-process store."""

    def __init__(self, store: MemorySessionStore, session_id: str, history: list[Turn], lock: AsyncExitStack) -> None:
        self._store, self._session_id, self.history, self._lock = store, session_id, history, lock

    async def commit(self, turn: Turn) -> None:
        try:
            await self._store.append(self._session_id, turn)
        finally:
            await self.release()

    async def release(self) -> None:
        await self._lock.aclose()  # a second call finds nothing left to release


def _new_session_id() -> str:
    return uuid.uuid4().hex
