"""Wrappers that add metrics to a boundary without its implementation knowing: the session store
(latency per operation, store_unavailable errors) and the chat backend (errors by kind)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from app.llm.base import ChatBackend, Completion, GenerationOptions, LLMError
from app.observability.metrics import observe_backend_error, timed_store_operation
from app.sessions.base import OpenTurn, SessionInfo, SessionStore, Turn


class InstrumentedSessionStore:
    """Implements app.sessions.base.SessionStore by delegating to `inner`, timing every operation."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # anything beyond the protocol (e.g. a redis client handle)
        return getattr(self.inner, name)

    async def create(self, owner: str | None = None) -> SessionInfo:
        with timed_store_operation("create"):
            return await self.inner.create(owner)

    async def get(self, session_id: str) -> SessionInfo | None:
        with timed_store_operation("get"):
            return await self.inner.get(session_id)

    async def history(self, session_id: str, last: int | None = None) -> list[Turn]:
        with timed_store_operation("history"):
            return await self.inner.history(session_id, last)

    async def append(self, session_id: str, turn: Turn) -> None:
        with timed_store_operation("append"):
            await self.inner.append(session_id, turn)

    async def set_feedback(self, session_id: str, turn_id: str, value: int) -> None:
        with timed_store_operation("set_feedback"):
            await self.inner.set_feedback(session_id, turn_id, value)

    async def delete(self, session_id: str) -> bool:
        with timed_store_operation("delete"):
            return await self.inner.delete(session_id)

    def lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self.inner.lock(session_id)

    @asynccontextmanager
    async def open_turn(
        self, session_id: str, *, last: int, owner: str | None = None, check_owner: bool = False
    ) -> AsyncIterator[OpenTurn]:
        async with AsyncExitStack() as stack:
            with timed_store_operation("open_turn"):  # includes any wait for another turn of the session
                held = await stack.enter_async_context(
                    self.inner.open_turn(session_id, last=last, owner=owner, check_owner=check_owner)
                )
            yield _TimedTurn(held)

    async def ping(self) -> None:
        with timed_store_operation("ping"):
            await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _TimedTurn:
    def __init__(self, inner: OpenTurn) -> None:
        self.inner = inner
        self.history = inner.history

    async def commit(self, turn: Turn) -> None:
        with timed_store_operation("commit"):
            await self.inner.commit(turn)


class InstrumentedChatBackend:
    """Implements app.llm.base.ChatBackend by delegating to `inner`, counting LLMErrors by their code."""

    def __init__(self, inner: ChatBackend) -> None:
        self.inner = inner

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def continues_assistant(self) -> bool:
        return self.inner.continues_assistant

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def complete(self, messages: list[dict[str, str]], options: GenerationOptions | None = None) -> Completion:
        try:
            return await self.inner.complete(messages, options)
        except LLMError as exc:
            observe_backend_error(exc.code)
            raise

    async def stream(
        self, messages: list[dict[str, str]], options: GenerationOptions | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        try:
            async for delta in self.inner.stream(messages, options, **kwargs):
                yield delta
        except LLMError as exc:
            observe_backend_error(exc.code)
            raise

    async def complete_prompt(self, prompt: str, options: GenerationOptions | None = None) -> Completion:
        try:
            return await self.inner.complete_prompt(prompt, options)
        except LLMError as exc:
            observe_backend_error(exc.code)
            raise

    async def health(self) -> None:
        await self.inner.health()

    async def aclose(self) -> None:
        await self.inner.aclose()
