"""The app's lifespan (app/main.py): what it does to the process around the state it builds."""

from __future__ import annotations

import gc
import logging
import uuid
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.llm.client import OpenAICompatClient
from app.main import create_app
from app.sessions.factory import build_session_store
from app.sessions.memory import MemorySessionStore
from app.settings import Settings
from app.state import AppState
from tests.admin.helpers import initial_live
from tests.fixtures.redis import SHARED_REDIS_URL, _unavailable, redis_answers


def test_startup_objects_are_frozen_out_of_the_garbage_collector_while_serving(tmp_path: Path) -> None:
    """Startup leaves hundreds of thousands of long-lived objects; a full collection walking them all stalls
    every request in flight. They are frozen once the state is built, and unfrozen at shutdown."""
    settings = Settings(data_dir=tmp_path, redis_url=None, ui_enabled=False, rag_enabled=False)

    async def state_factory(settings: Settings) -> AppState:
        return AppState(
            settings=settings,
            llm=OpenAICompatClient("http://127.0.0.1:9/v1", "m"),
            store=MemorySessionStore(ttl_s=60, max_turns=10),
            embedder=None,  # type: ignore[arg-type]  # no turn runs here
            retriever=None,
            rails=initial_live(),
        )

    gc.unfreeze()
    app = create_app(settings, state_factory=state_factory)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 10_000  # the interpreter and every imported module at least
    assert gc.get_freeze_count() == 0


def test_auto_redis_url_is_settled_once_for_every_part_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`make run` (serve --redis-auto): the Redis on 127.0.0.1:6379 answers here, so the sessions, the rate
    limiter and the log line all use it; tests/sessions/test_factory.py covers the fallback to memory."""
    if not redis_answers(SHARED_REDIS_URL):
        _unavailable(f"no Redis answers at {SHARED_REDIS_URL}")
    prefix = f"guardchat-test-{uuid.uuid4().hex[:8]}:"
    settings = Settings(
        data_dir=tmp_path,
        redis_url="auto",
        redis_key_prefix=prefix,
        rate_limit="100/minute",
        ui_enabled=False,
        rag_enabled=False,
        log_format="text",
    )

    async def state_factory(settings: Settings) -> AppState:
        return AppState(
            settings=settings,
            llm=OpenAICompatClient("http://127.0.0.1:9/v1", "m"),
            store=build_session_store(settings),
            embedder=None,  # type: ignore[arg-type]  # no turn runs here
            retriever=None,
            rails=initial_live(),
        )

    app = create_app(settings, state_factory=state_factory)
    assert settings.redis_url == SHARED_REDIS_URL
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        with caplog.at_level(logging.INFO, logger="guardchat"), TestClient(app) as http:
            session_id = http.post("/api/sessions").json()["id"]
            assert client.exists(f"{prefix}session:{{{session_id}}}:meta")
            assert app.state.guardchat_security.limiter.shared
        assert f"session store: Redis at {SHARED_REDIS_URL} (auto: it answered)" in caplog.messages
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
