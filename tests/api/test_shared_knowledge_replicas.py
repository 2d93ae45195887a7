"""Two real `guardchat serve` processes on the real Redis (key prefix unique to the test), each with its own
knowledge dir and index: an upload through A is searchable on B, a delete through B is gone on A.

Behaviour only: the time it takes is measured by bench/knowledge_propagation.py (issue 16 item 3: 2 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.rag.embedder import MiniLMEmbedder
from app.rag.ingest import ingest
from app.settings import Settings
from tests.fixtures.redis import delete_keys_with_prefix
from tests.fixtures.server import free_port
from tests.rag.conftest import make_settings, write_corpus

pytestmark = pytest.mark.slow

API_KEY = "key-shared-knowledge-" + uuid.uuid4().hex[:8]
ADMIN_TOKEN = "admin-shared-knowledge-" + uuid.uuid4().hex  # changing the knowledge base needs it
LAUNCH = "import sys\nfrom app.cli import app\napp(['serve', '--port', sys.argv[1]], prog_name='guardchat')\n"
PETS = b"# Pet accounts\n\nThe Larkspur Pet Fund account pays 7% APY on balances for pets."
PETS_QUESTION = "What interest does the Pet Fund pay?"
WIRES_QUESTION = "How much does an outgoing domestic wire transfer cost?"


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"replica {self.name} did not start: {self.log.read_text()[-3000:]}")


def _environment(settings: Settings, redis_url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDCHAT_")}
    env.update(
        {
            # No turn is run here: the chat LLM is never asked (nothing listens on port 9).
            "GUARDCHAT_LLM_BACKEND": "openai",
            "GUARDCHAT_LLM_URL": "http://127.0.0.1:9/v1",
            "GUARDCHAT_LLM_MODEL": "none",
            "GUARDCHAT_EMBED_ENGINE": "torch",  # no OpenVINO conversion into each fresh data dir
            "GUARDCHAT_DATA_DIR": str(settings.data_dir),
            "GUARDCHAT_KNOWLEDGE_DIR": str(settings.knowledge_dir),
            "GUARDCHAT_RAG_SCORE_THRESHOLD": str(settings.rag_score_threshold),  # as the index was built for
            "GUARDCHAT_REDIS_URL": redis_url,
            "GUARDCHAT_REDIS_KEY_PREFIX": prefix,
            "GUARDCHAT_API_KEYS": json.dumps([API_KEY]),
            "GUARDCHAT_ADMIN_TOKEN": ADMIN_TOKEN,
            "GUARDCHAT_UI_ENABLED": "false",
            "GUARDCHAT_LOG_LEVEL": "info",
            "NEMO_GUARDRAILS_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


@pytest.fixture(scope="module")
def servers(
    redis_url: str, embedder: MiniLMEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    prefix = f"guardchat-test:{uuid.uuid4().hex[:12]}:"
    started: list[Server] = []
    try:
        for name in ("a", "b"):
            root = tmp_path_factory.mktemp(f"replica-{name}")
            settings = make_settings(root)
            write_corpus(settings.knowledge_dir)  # the documents every replica has from its image
            ingest([settings.knowledge_dir], settings, embedder=embedder, progress=False)
            port, log = free_port(), root / "server.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-c", LAUNCH, str(port)],
                    env=_environment(settings, redis_url, prefix),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append(Server(name, f"http://127.0.0.1:{port}", process, log))
        deadline = time.monotonic() + 300
        for server in started:
            server.wait_healthy(deadline)
        yield started[0], started[1]
    finally:
        for server in started:
            server.process.terminate()
        for server in started:
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()
        delete_keys_with_prefix(redis_url, prefix)


def client(server: Server, token: str = API_KEY) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def search_ids(http: httpx.Client, query: str) -> list[str]:
    response = http.post("/v1/search", json={"query": query, "k": 3})
    assert response.status_code == 200, response.text
    return [hit["document_id"] for hit in response.json()["results"]]


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"not true after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_an_upload_on_a_is_searchable_on_b_and_a_delete_on_b_is_gone_on_a(servers: tuple[Server, Server]) -> None:
    a, b = servers
    with client(a) as on_a, client(b) as on_b, client(a, ADMIN_TOKEN) as admin_a, client(b, ADMIN_TOKEN) as admin_b:
        assert "uploads/pets" not in search_ids(on_b, PETS_QUESTION)
        uploaded = admin_a.post("/api/knowledge", files=[("files", ("pets.md", PETS, "text/markdown"))])
        assert uploaded.status_code == 200 and uploaded.json()["ingested"] == 1, uploaded.text
        seconds = eventually(lambda: search_ids(on_b, PETS_QUESTION)[:1] == ["uploads/pets"])
        print(f"upload on A searchable on B after {seconds:.2f} s")

        assert "wires" in search_ids(on_a, WIRES_QUESTION)
        for document_id in ("uploads/pets", "wires"):
            deleted = admin_b.delete(f"/api/knowledge/{document_id}")
            assert deleted.status_code == 200, deleted.text
        seconds = eventually(
            lambda: (
                "uploads/pets" not in search_ids(on_a, PETS_QUESTION)
                and "wires" not in search_ids(on_a, WIRES_QUESTION)
            )
        )
        print(f"deletes on B gone on A after {seconds:.2f} s")
        listed = {d["document_id"] for d in admin_a.get("/api/knowledge").json()["documents"]}
        assert "uploads/pets" not in listed and "wires" not in listed and "cards" in listed
