"""The app's lifespan (app/main.py): what it does to the process around the state it builds."""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi.testclient import TestClient

from app.llm.client import OpenAICompatClient
from app.main import create_app
from app.sessions.memory import MemorySessionStore
from app.settings import Settings
from app.state import AppState
from tests.admin.helpers import initial_live


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
