from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from app.api import knowledge, search
from app.api.errors import install_error_handlers
from app.rag.embedder import MiniLMEmbedder
from app.rag.knowledge_admin import safe_filename
from app.rag.retrieve import HybridRetriever
from app.settings import Settings
from app.state import AppState
from tests.rag.conftest import make_settings


def make_app(settings: Settings, embedder: MiniLMEmbedder) -> FastAPI:
    app = FastAPI()
    app.include_router(knowledge.router)
    app.include_router(search.router)
    install_error_handlers(app)
    app.state.guardchat = AppState(
        settings=settings,
        llm=None,
        store=None,
        embedder=embedder,  # type: ignore[arg-type]
        retriever=HybridRetriever(settings),
        rails=None,
    )  # type: ignore[arg-type]
    return app


@pytest_asyncio.fixture
async def client(tmp_path: Path, embedder: MiniLMEmbedder) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path).model_copy(update={"ingest_max_file_bytes": 5000})
    transport = httpx.ASGITransport(app=make_app(settings, embedder))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
        http.headers["x-test-kb"] = str(settings.knowledge_dir)
        yield http


async def _search(client: httpx.AsyncClient, query: str) -> list[dict]:
    response = await client.post("/v1/search", json={"query": query, "k": 3})
    assert response.status_code == 200
    return response.json()["results"]


def test_safe_filename() -> None:
    assert safe_filename("../../etc/passwd.md") == "passwd.md"
    assert safe_filename("..\\..\\windows\\fees.TXT") == "fees.txt"
    assert safe_filename("Überweisung Gebühren (2024).md") == "Uberweisung-Gebuhren-2024.md"
    assert safe_filename(".hidden.md") == "hidden.md"
    assert safe_filename("...md").startswith("upload-")
    with pytest.raises(ValueError):
        safe_filename("payload.exe")
    with pytest.raises(ValueError):
        safe_filename(None)


async def test_upload_list_search_update_delete(client: httpx.AsyncClient) -> None:
    kb = Path(client.headers["x-test-kb"])
    assert (await client.get("/api/knowledge")).json() == {"documents": [], "total_documents": 0, "total_chunks": 0}

    files = [
        (
            "files",
            (
                "../../escape/pets.md",
                b"# Pet accounts\n\nThe Larkspur Pet Fund account pays 7% APY for pets.",
                "text/markdown",
            ),
        ),
        ("files", ("junk.txt", os.urandom(200).replace(b"\x00", b"\x01") + b"\x00", "text/plain")),
        ("files", ("tool.exe", b"MZ", "application/octet-stream")),
        ("files", ("huge.txt", b"lorem ipsum " * 1000, "text/plain")),
    ]
    response = await client.post("/api/knowledge", files=files)
    assert response.status_code == 200
    results = {r["filename"]: r for r in response.json()["results"]}
    pets = results["../../escape/pets.md"]
    assert (pets["status"], pets["saved_as"], pets["document_id"]) == ("added", "uploads/pets.md", "uploads/pets")
    assert pets["chunks"] >= 1
    assert results["junk.txt"]["status"] == "error" and results["junk.txt"]["code"] == "binary"
    assert results["tool.exe"]["status"] == results["huge.txt"]["status"] == "error"
    # Only the good upload stays on disk, inside the uploads dir; nothing escaped it.
    assert sorted(p.name for p in (kb / "uploads").iterdir()) == ["pets.md"]
    assert not (kb.parent / "escape").exists() and not (kb / "escape").exists()

    # Searchable immediately (the retriever reloaded), listed with chunk counts.
    assert (await _search(client, "What interest does the Pet Fund pay?"))[0]["document_id"] == "uploads/pets"
    listing = (await client.get("/api/knowledge")).json()
    assert [(d["document_id"], d["source"], d["chunks"]) for d in listing["documents"]] == [
        ("uploads/pets", "uploads/pets.md", pets["chunks"])
    ]
    assert "path" not in listing["documents"][0]

    # Re-uploading the same name with new content replaces the document.
    new = [("files", ("pets.md", b"# Pet accounts\n\nThe Larkspur Pet Fund account now pays 9% APY.", "text/markdown"))]
    updated = (await client.post("/api/knowledge", files=new)).json()["results"][0]
    assert updated["status"] == "updated"
    hits = await _search(client, "What interest does the Pet Fund pay?")
    assert "9% APY" in hits[0]["content"] and not any("7% APY" in h["content"] for h in hits)

    deleted = await client.delete("/api/knowledge/uploads/pets")
    assert deleted.status_code == 200 and deleted.json()["file_removed"] is True
    assert not (kb / "uploads" / "pets.md").exists()
    assert await _search(client, "What interest does the Pet Fund pay?") == []
    missing = await client.delete("/api/knowledge/uploads/pets")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "Unknown document 'uploads/pets'.",
        "type": "not_found_error",
        "code": "document_not_found",
        "param": None,
    }


async def test_upload_requires_files(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/knowledge", data={"nothing": "here"})
    assert response.status_code == 422 and "error" in response.json()
