"""Process-wide state built once in the FastAPI lifespan (app/main.py) and reached by routes via
`request.app.state.guardchat` (see app/api/deps.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from app.guard.base import Guard
from app.llm.base import ChatBackend
from app.rag.base import Embedder, Retriever
from app.sessions.base import SessionStore
from app.settings import Settings

if TYPE_CHECKING:  # the components below import this module: their types only, for the annotations
    from app.admin.publisher import RailsPublisher
    from app.guard.base import Classifier
    from app.llm.embedded import EmbeddedLLMServer
    from app.llm.page_warmer import PageWarmer
    from app.rag.grounding import CachedGroundingCheck
    from app.rag.shared_knowledge import SharedKnowledge


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
    # Embeds a turn's user message (and its rewritten query): the guard model's shared pass where it has one
    # (app/guard/shared_pass.py), which reads the message anyway; None = `embedder`.
    query_embedder: Embedder | None = None
    # Set by app/main.py build_state (a state built by hand, as in tests, leaves what it does not need):
    embedded_server: EmbeddedLLMServer | None = None  # the llama.cpp server this process started (closed last)
    # The guard model the start-up guard uses; rails publishes validate and build with the same one. "auto": load
    # the configured one when needed. None: the config runs without one (no shipped weights).
    detector: Classifier | None | Literal["auto"] = "auto"
    grounding: CachedGroundingCheck | None = None  # the groundedness rail's check, primed with the index's vectors
    rails_publisher: RailsPublisher | None = None  # app/admin/wiring.py build_rails_publisher: follows publishes
    shared_knowledge: SharedKnowledge | None = None  # with Redis: app/rag/shared_knowledge.py
    # One knowledge change (upload, delete, re-index, sync from another replica) at a time: a sync must never see
    # a file that is saved but not yet published.
    ingest_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # With rag_context_mode "pages" and the embedded LLM: which answer pages its prompt cache holds (app/main.py).
    page_warmer: PageWarmer | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)  # start-up tasks close_state cancels
