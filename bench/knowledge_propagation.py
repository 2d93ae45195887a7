"""How long an upload (or delete) through one replica takes to be searchable (or gone) on another (issue 16
item 3: within 2 s).

Two real `guardchat` processes (bench/serve.py) on one Redis under a fresh key prefix, with the fake
backends, each with its own knowledge dir (a copy of knowledge/) and its own index of it. Each run uploads
a new small document through one replica (`POST /api/knowledge`, alternating A and B), polls the other's
`/v1/search` every 20 ms until the document is the top hit, then deletes it through that other replica and
polls the uploader until it is gone.

Reported: `upload_s` (the POST's own latency), `found_after_200_s` (from the POST's 200 to the other
replica returning it), `delete_s` and `gone_after_200_s`; `--timeout` caps each wait (the code before the
shared store never propagates: every row then reads the timeout).

    python -m bench.knowledge_propagation [--runs 6] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import PROJECT_ROOT, Child, print_table, summarize, write_result
from bench.rails_propagation import ADMIN_TOKEN, _delete_keys, replica_data_dir, start_replica
from bench.stack import start_backends

TOPICS = [
    "llama grooming",
    "glacier hiking",
    "violin repair",
    "beekeeping",
    "kite surfing",
    "origami",
    "falconry",
    "cave diving",
    "bonsai care",
    "sourdough baking",
    "chess openings",
    "pottery glazes",
]


def document(run: int) -> tuple[str, bytes, str]:
    topic = TOPICS[run % len(TOPICS)]
    code = uuid.uuid4().hex[:6].upper()
    text = (
        f"# The {topic} allowance\n\nLarkspur customers can claim the {topic} allowance, reference {code}, "
        f"once per calendar year at any branch.\n"
    )
    return f"bench-{run}-{code.lower()}.md", text.encode(), f"Who can claim the {topic} allowance?"


def top_ids(http: httpx.Client, query: str) -> list[str]:
    response = http.post("/v1/search", json={"query": query, "k": 3})
    response.raise_for_status()
    return [hit["document_id"] for hit in response.json()["results"]]


def wait_until(check: Any, timeout_s: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic() - started


def one_run(uploader: httpx.Client, other: httpx.Client, run: int, timeout_s: float) -> dict[str, Any]:
    name, data, question = document(run)
    doc_id = f"uploads/{name.removesuffix('.md')}"
    sent = time.monotonic()
    response = uploader.post("/api/knowledge", files=[("files", (name, data, "text/markdown"))])
    upload_s = time.monotonic() - sent
    response.raise_for_status()
    found = wait_until(lambda: top_ids(other, question)[:1] == [doc_id], timeout_s)
    sent = time.monotonic()
    deleted = other.delete(f"/api/knowledge/{doc_id}")
    delete_s = time.monotonic() - sent
    gone = float("inf")
    if deleted.status_code == 200:
        gone = wait_until(lambda: doc_id not in top_ids(uploader, question), timeout_s)
    return {
        "run": run,
        "upload_s": upload_s,
        "found_after_200_s": found,
        "delete_s": delete_s,
        "gone_after_200_s": gone,
    }


def knowledge_copy(root: Path, name: str) -> Path:
    target = root / f"knowledge-{name}"
    shutil.copytree(PROJECT_ROOT / "knowledge", target, ignore=shutil.ignore_patterns("uploads"))
    return target


def index_knowledge(knowledge_dir: Path, data_dir: Path) -> None:
    from app.rag.embedder import get_embedder
    from app.rag.ingest import ingest
    from app.settings import Settings

    ingest(
        [knowledge_dir],
        Settings(data_dir=data_dir, knowledge_dir=knowledge_dir),
        embedder=get_embedder(),
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--timeout", type=float, default=10.0, help="give up waiting after this many seconds")
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--shared-data",
        type=Path,
        default=PROJECT_ROOT / "data",
        help="a DATA_DIR whose models/ and cache/ the replicas link to",
    )
    args = parser.parse_args()

    prefix = f"bench-knowledge-{uuid.uuid4().hex[:8]}:"
    root = Path(tempfile.mkdtemp(prefix="bench-knowledge-"))
    backends = start_backends()
    replicas: list[Child] = []
    try:
        for name in ("a", "b"):
            knowledge_dir, data_dir = knowledge_copy(root, name), replica_data_dir(root, name, args.shared_data)
            index_knowledge(knowledge_dir, data_dir)
            replicas.append(
                start_replica(
                    name,
                    backends,
                    args.redis_url,
                    prefix,
                    data_dir,
                    GUARDCHAT_RAG_ENABLED="true",
                    GUARDCHAT_KNOWLEDGE_DIR=str(knowledge_dir),
                )
            )
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with (
            httpx.Client(base_url=replicas[0].url, headers=headers, timeout=120) as a,
            httpx.Client(base_url=replicas[1].url, headers=headers, timeout=120) as b,
        ):
            runs = [one_run(*((a, b) if i % 2 == 0 else (b, a)), i, args.timeout) for i in range(args.runs)]
    finally:
        for child in replicas:
            child.stop()
        backends.stop()
        _delete_keys(args.redis_url, prefix)
        shutil.rmtree(root, ignore_errors=True)
    keys = ("upload_s", "found_after_200_s", "delete_s", "gone_after_200_s")
    summary = {key: summarize([r[key] for r in runs]) for key in keys}
    print_table(
        ["measure", "n", "p50 s", "max s"],
        [[k, len(runs), summary[k]["p50"], summary[k]["max"]] for k in keys],
        title="knowledge change on one replica -> seen on the other",
    )
    write_result("knowledge_propagation" + (f"-{args.label}" if args.label else ""), {"runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
