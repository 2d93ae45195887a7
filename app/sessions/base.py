"""The session boundary. A session is an ordered list of turns; a turn is written whole or not at all."""

from __future__ import annotations

import re
import time
import uuid
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

# Session ids are ours (uuid4 hex), but they arrive from clients: anything else is simply "not found".
# Keeping them to this alphabet also keeps Redis keys (and cluster hash tags) well-formed.
_SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")

# How long a turn waits for the one before it in the same session before giving up with SessionBusy.
DEFAULT_LOCK_WAIT_S = 60.0


class SessionBusy(Exception):
    """Another turn of this session held the lock for longer than we were willing to wait.

    The API answers 409 `session_busy` (the client may retry once the other turn has finished).
    """


def is_valid_session_id(session_id: str) -> bool:
    return bool(_SESSION_ID_PATTERN.fullmatch(session_id))


class SessionNotFound(Exception):
    pass


class StoreUnavailable(Exception):
    """The backing store cannot be reached. The API answers 503 `store_unavailable`."""


class Turn(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = Field(default_factory=time.time)
    user: str
    answer: str
    status: Literal["ok", "blocked", "interrupted", "error"] = "ok"
    blocked: bool = False
    # rails, citations, timings_ms, trace ... (the `guardchat` object of the response)
    metadata: dict[str, Any] = Field(default_factory=dict)
    feedback: int | None = None  # +1 / -1 from the UI


class SessionInfo(BaseModel):
    id: str
    created_at: float
    owner: str | None = None  # hash of the API key that created it
    turn_count: int = 0


class OpenTurn(Protocol):
    """A session held for one turn (`SessionStore.open_turn`): its recent history, read when the turn's lock was
    taken, and `commit`, which stores the turn and lets go of the lock in one step."""

    history: list[Turn]

    async def commit(self, turn: Turn) -> None:
        """Atomically append `turn` (as `SessionStore.append`) and release the session. Raises SessionNotFound
        (deleted meanwhile) or StoreUnavailable; the lock is then released when the turn's block exits."""
        ...


class SessionStore(Protocol):
    async def create(self, owner: str | None = None) -> SessionInfo: ...

    async def get(self, session_id: str) -> SessionInfo | None: ...

    async def history(self, session_id: str, last: int | None = None) -> list[Turn]:
        """The turns, oldest first; only the `last` N when given (a turn's prompt needs no more, and reading
        every stored turn's metadata is most of a long session's load time). Raises SessionNotFound.
        Refreshes the TTL."""
        ...

    async def append(self, session_id: str, turn: Turn) -> None:
        """Atomically append one turn, trim beyond the limit, refresh the TTL. Raises SessionNotFound."""
        ...

    async def set_feedback(self, session_id: str, turn_id: str, value: int) -> None:
        """Raises SessionNotFound (also for an unknown turn id)."""
        ...

    async def delete(self, session_id: str) -> bool: ...

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Serializes turns of one session (across replicas for Redis)."""
        ...

    def open_turn(
        self, session_id: str, *, last: int, owner: str | None = None, check_owner: bool = False
    ) -> AbstractAsyncContextManager[OpenTurn]:
        """Holds the session's lock for the block, with its `last` turns read (TTL refreshed). A chat turn is
        `open_turn` → `commit`: Redis does both in one round trip each instead of get, lock, history, append
        and unlock. Raises SessionNotFound, without queueing for the lock, when the session does not exist or
        (`check_owner`) `owner` did not create it."""
        ...

    async def ping(self) -> None:
        """Raises StoreUnavailable."""
        ...

    async def aclose(self) -> None: ...
