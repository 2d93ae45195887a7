"""`make_store(**options)`: the same conformance tests run against the memory store and a real Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.sessions.base import SessionStore
from app.sessions.memory import MemorySessionStore

StoreMaker = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> StoreMaker:
    if request.param == "redis":
        # Requested lazily so the memory half still runs where no Redis exists.
        redis_factory: StoreMaker = request.getfixturevalue("redis_store_factory")
        return redis_factory

    def make_memory(**overrides: Any) -> SessionStore:
        options: dict[str, Any] = {"ttl_s": 3600, "max_turns": 50}
        options.update(overrides)
        return MemorySessionStore(**options)

    return make_memory
