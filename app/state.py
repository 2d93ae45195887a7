"""Process-wide state built once in the FastAPI lifespan (app/main.py) and reached by routes via
`request.app.state.guardchat` (see app/api/deps.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from app.guard.base import Guard
from app.llm.base import ChatBackend
from app.rag.base import Embedder, Retriever
from app.sessions.base import SessionStore
from app.settings import Settings


@dataclass
class LoadedRails:
    """One loaded, validated rails config. Immutable once built: a publish builds a new one."""

    version: str
    guard: Guard
    files: dict[str, str] = field(default_factory=dict)


class LiveRails:
    """Holds the live rails config. Publishing swaps the reference atomically: a turn reads
    `.current` once at its start and finishes on that object, so in-flight turns are unaffected."""

    def __init__(self, initial: LoadedRails) -> None:
        self._current = initial
        self._swap_lock = asyncio.Lock()

    @property
    def current(self) -> LoadedRails:
        return self._current

    async def swap(self, new: LoadedRails) -> LoadedRails:
        async with self._swap_lock:
            old, self._current = self._current, new
            return old


@dataclass
class AppState:
    settings: Settings
    llm: ChatBackend
    store: SessionStore
    embedder: Embedder
    retriever: Retriever | None
    rails: LiveRails
    extras: dict[str, Any] = field(default_factory=dict)  # embedded server handle, admin store, ...
    # Embeds a turn's user message (and its rewritten query): the guard model's shared pass where it has one
    # (app/guard/shared_pass.py), which reads the message anyway; None = `embedder`.
    query_embedder: Embedder | None = None
