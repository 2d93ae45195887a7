"""Shared knowledge (app/rag/shared_knowledge.py) through the real knowledge API: two app instances, each
with its own knowledge dir and index, on the real Redis under a key prefix unique to the test. An upload or
delete through one is searchable (or gone) on the other; a replica started later catches up; nothing
outside the uploads dir is ever written from what Redis holds."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from app.rag.embedder import MiniLMEmbedder
from app.rag.ingest import ingest
from app.rag.retrieve import HybridRetriever
from app.rag.shared_knowledge import SharedKnowledge, SharedKnowledgeUnavailable, start_shared_knowledge
from app.state import AppState
from app.ui import knowledge_ops
from tests.api.test_knowledge import make_app
from tests.fixtures.redis import delete_keys_with_prefix
from tests.rag.conftest import make_settings, write_corpus

PETS = b"# Pet accounts\n\nThe Larkspur Pet Fund account pays 7% APY on balances for pets."
PETS_QUESTION = "What interest does the Pet Fund pay?"
WIRES_QUESTION = "How much does an outgoing domestic wire transfer cost?"


@dataclass
class Replica:
    http: httpx.AsyncClient
    knowledge_dir: Path
    shared: SharedKnowledge
    state: AppState


async def search_ids(replica: Replica, query: str) -> list[str]:
    response = await replica.http.post("/v1/search", json={"query": query, "k": 3})
    assert response.status_code == 200, response.text
    return [hit["document_id"] for hit in response.json()["results"]]


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> float:
    """Seconds until `check` holds (behaviour, not speed: bench/knowledge_propagation.py measures that)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, f"not true after {timeout_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@asynccontextmanager
async def replica_on(
    root: Path, name: str, redis_url: str, prefix: str, embedder: MiniLMEmbedder
) -> AsyncIterator[Replica]:
    settings = make_settings(root / name).model_copy(update={"redis_url": redis_url, "redis_key_prefix": prefix})
    write_corpus(settings.knowledge_dir)  # the shipped documents every replica has from its image
    ingest([settings.knowledge_dir], settings, embedder=embedder, progress=False)
    app = make_app(settings, embedder)
    state = app.state.guardchat
    state.retriever = HybridRetriever(settings)
    shared = await start_shared_knowledge(state)
    assert shared is not None and state.shared_knowledge is shared
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            yield Replica(http, settings.knowledge_dir, shared, state)
    finally:
        await shared.stop()


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    value = f"guardchat-test:{uuid.uuid4().hex[:12]}:"
    yield value
    delete_keys_with_prefix(redis_url, value)


async def test_uploads_and_deletes_reach_the_other_replica(
    tmp_path: Path, redis_url: str, prefix: str, embedder: MiniLMEmbedder
) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(replica_on(tmp_path, "a", redis_url, prefix, embedder))
        b = await stack.enter_async_context(replica_on(tmp_path, "b", redis_url, prefix, embedder))
        assert "uploads/pets" not in await search_ids(b, PETS_QUESTION)

        uploaded = await a.http.post("/api/knowledge", files=[("files", ("pets.md", PETS, "text/markdown"))])
        assert uploaded.status_code == 200 and uploaded.json()["ingested"] == 1, uploaded.text

        async def b_finds_pets() -> bool:
            return (await search_ids(b, PETS_QUESTION))[:1] == ["uploads/pets"]

        await eventually(b_finds_pets)
        assert (b.knowledge_dir / "uploads" / "pets.md").read_bytes() == PETS

        # A shipped document deleted on B disappears on A too (its file stays: it is part of the image).
        assert "wires" in await search_ids(a, WIRES_QUESTION)
        assert (await b.http.delete("/api/knowledge/wires")).status_code == 200

        async def a_lost_wires() -> bool:
            return "wires" not in await search_ids(a, WIRES_QUESTION)

        await eventually(a_lost_wires)
        assert (a.knowledge_dir / "wires.md").is_file()

        # An uploaded document deleted on B: gone from A's index and uploads dir.
        assert (await b.http.delete("/api/knowledge/uploads/pets")).status_code == 200

        async def a_lost_pets() -> bool:
            return "uploads/pets" not in await search_ids(a, PETS_QUESTION)

        await eventually(a_lost_pets)
        assert not (a.knowledge_dir / "uploads" / "pets.md").exists()

        # Uploaded again (e.g. by mistake deleted): it comes back everywhere.
        again = await b.http.post("/api/knowledge", files=[("files", ("pets.md", PETS, "text/markdown"))])
        assert again.json()["ingested"] == 1
        await eventually(lambda: _finds(a, PETS_QUESTION, "uploads/pets"))


async def _finds(replica: Replica, query: str, document_id: str) -> bool:
    return document_id in await search_ids(replica, query)


async def test_a_replica_started_later_catches_up(
    tmp_path: Path, redis_url: str, prefix: str, embedder: MiniLMEmbedder
) -> None:
    async with replica_on(tmp_path, "a", redis_url, prefix, embedder) as a:
        await a.http.post("/api/knowledge", files=[("files", ("pets.md", PETS, "text/markdown"))])
        assert (await a.http.delete("/api/knowledge/wires")).status_code == 200
    # A is gone; C starts on a fresh index of the shipped documents and applies both changes before serving.
    async with replica_on(tmp_path, "c", redis_url, prefix, embedder) as c:
        assert (await search_ids(c, PETS_QUESTION))[:1] == ["uploads/pets"]
        assert "wires" not in await search_ids(c, WIRES_QUESTION)
        assert c.shared.applied_version == 2


async def test_names_from_the_store_never_leave_the_uploads_dir(
    tmp_path: Path, redis_url: str, prefix: str, embedder: MiniLMEmbedder
) -> None:
    async with replica_on(tmp_path, "a", redis_url, prefix, embedder) as a:
        redis = Redis.from_url(redis_url)
        try:
            knowledge = f"{prefix}{{knowledge}}:"
            for rel in ("../escape.md", "uploads/../../escape.md", "uploads/.hidden.md", "notes.md", "uploads/x.exe"):
                await redis.set(f"{knowledge}file:{rel}", b"# Escape\n\nNot allowed.")
                await redis.hset(f"{knowledge}files", rel, "0" * 64)
            await redis.incr(f"{knowledge}version")
        finally:
            await redis.aclose()
        assert await a.shared.sync() is False  # nothing to apply: every name was refused
        assert not (tmp_path / "escape.md").exists() and not (tmp_path / "a" / "escape.md").exists()
        assert not (a.knowledge_dir / "notes.md").exists()
        uploads = a.knowledge_dir / "uploads"
        assert not uploads.exists() or not any(uploads.iterdir())


async def test_an_unreachable_store_answers_503_and_says_the_change_stayed_local(
    tmp_path: Path, redis_url: str, prefix: str, embedder: MiniLMEmbedder
) -> None:
    async with replica_on(tmp_path, "a", redis_url, prefix, embedder) as a:
        # The store's connection now points at a port nothing listens on (Redis down).
        working, a.shared.redis = a.shared.redis, Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
        try:
            uploaded = await a.http.post("/api/knowledge", files=[("files", ("pets.md", PETS, "text/markdown"))])
            assert uploaded.status_code == 503, uploaded.text
            error = uploaded.json()["error"]
            assert error["code"] == "knowledge_store_unavailable" and "this replica only" in error["message"]
            assert (await search_ids(a, PETS_QUESTION))[:1] == ["uploads/pets"]  # kept here
            with pytest.raises(SharedKnowledgeUnavailable):
                await a.shared.publish_deletion("wires", None)
        finally:
            await a.shared.redis.aclose()
            a.shared.redis = working


async def test_console_uploads_and_deletes_are_shared_too(
    tmp_path: Path, redis_url: str, prefix: str, embedder: MiniLMEmbedder
) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(replica_on(tmp_path, "a", redis_url, prefix, embedder))
        b = await stack.enter_async_context(replica_on(tmp_path, "b", redis_url, prefix, embedder))
        source = tmp_path / "gradio-temp" / "pets.md"  # where Gradio leaves an uploaded file
        source.parent.mkdir()
        source.write_bytes(PETS)
        report = await knowledge_ops.upload(a.state, [source])
        assert "Warning" not in report, report
        await eventually(lambda: _finds(b, PETS_QUESTION, "uploads/pets"))
        report = await knowledge_ops.delete(b.state, "uploads/pets")
        assert "Warning" not in report, report

        async def a_lost_pets() -> bool:
            return not await _finds(a, PETS_QUESTION, "uploads/pets")

        await eventually(a_lost_pets)
        assert not (a.knowledge_dir / "uploads" / "pets.md").exists()
