"""TurnRunner end to end on real parts: a Redis session store, MiniLM, and an LLM server speaking the OpenAI
streaming wire (a local stand-in: these tests are about the pipeline, not the model)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from app.llm.client import OpenAICompatClient
from app.pipeline.turn import TurnRequest, TurnRunner
from app.sessions.redis import SessionBusy
from app.settings import Settings
from app.state import AppState
from tests.admin.helpers import initial_live
from tests.fixtures.redis import StoreFactory
from tests.llm import wire

QUESTION = "How do I freeze my card?"


class LockRecordingStore:
    """The real Redis store, noting when a turn lets go of a session's lock."""

    def __init__(self, inner: Any, events: list[str]) -> None:
        self._inner, self._events = inner, events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[None]:
        try:
            async with self._inner.lock(session_id):
                yield
        finally:
            self._events.append("lock released")


async def test_run_releases_the_session_lock_before_it_returns(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """`run()` stops at the Done event; the turn's generator (which holds the session lock) must be closed
    then, not whenever it is garbage-collected: the same client's next turn would find the lock still held
    and wait a poll interval (50 ms) for its own finished turn."""

    async def handler(request, body):
        return wire.stream_response(wire.sse(["Open ", "Cards ", "and ", "tap ", "Freeze."]))

    events: list[str] = []
    store = LockRecordingStore(redis_store_factory(), events)
    impatient = redis_store_factory(lock_wait_s=0.01, lock_poll_s=0.005)  # same keys, gives up at once
    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = AppState(
            settings=Settings(data_dir=tmp_path, rag_enabled=False),
            llm=llm,
            store=store,
            embedder=embedder,
            retriever=None,
            rails=initial_live(),
        )
        try:
            session = await store.create()
            runner = TurnRunner(state)
            for n in range(3):
                messages = [{"role": "user", "content": f"{QUESTION} ({n})"}]
                result = await runner.run(TurnRequest(messages=messages, session_id=session.id))
                events.append("run returned")
                assert result.answer == "Open Cards and tap Freeze." and not result.blocked
                try:
                    async with impatient.lock(session.id):
                        pass
                except SessionBusy:
                    raise AssertionError(f"turn {n} returned while still holding the session lock") from None
            assert events == ["lock released", "run returned"] * 3
            assert [t.user for t in await store.history(session.id)] == [f"{QUESTION} ({n})" for n in range(3)]
        finally:
            await llm.aclose()
