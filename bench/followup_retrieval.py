"""hit@5 of follow-up questions' retrieval queries on the shipped knowledge base (issue 18, item 2).

    .venv/bin/python -m bench.followup_retrieval [--tasks tests/data/rag_followups.jsonl] [--k 5]

Each task is earlier turns, a follow-up written the way customers write, its gold documents and the
self-contained question it stands for. The follow-up's retrieval query is what the pipeline builds
(app/rag/rewrite.py, "join" mode: no LLM); it is searched as the server does (hybrid, threshold on) and
counted a hit when a gold document is in the top k. Reported beside it: the follow-up searched alone (no
rewrite) and the self-contained question (what the rewrite should reach). Only public APIs that exist since
the first rewrite (rewrite_query, HybridRetriever.search), so the same script measures an older checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from app.rag.embedder import get_embedder
from app.rag.ingest import ingest_directory
from app.rag.retrieve import HybridRetriever
from app.rag.rewrite import rewrite_query
from app.settings import PROJECT_ROOT, Settings

TASKS = PROJECT_ROOT / "tests" / "data" / "rag_followups.jsonl"


def _hit(retriever: HybridRetriever, embedder: Any, query: str, gold: set[str], k: int) -> bool:
    chunks, _ = retriever.search(query, embedder.embed([query])[0], k)
    return any(c.document_id in gold for c in chunks[:k])


def _settled(retriever: HybridRetriever, embedder: Any, rewrite: Any, question: str) -> str:
    """The query the pipeline searches (app/pipeline/context.py `settle_query`; older code: the rewrite)."""
    try:
        from app.rag.rewrite import settle
    except ImportError:  # before item 2: the rewrite is the query
        return str(rewrite.query)

    def nearest(vec: Any) -> Any:
        found = retriever.dense_search(vec, 1)
        stored = retriever.embeddings_for(found) if found else None
        return None if stored is None else stored[0]

    question_vec, query_vec = embedder.embed([question, rewrite.query])
    return str(settle(question, rewrite, question_vec, query_vec, nearest)[0])


def run(tasks_path: Path, k: int) -> dict[str, Any]:
    tasks = [json.loads(line) for line in tasks_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    embedder = get_embedder()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), knowledge_dir=PROJECT_ROOT / "knowledge", embed_ingest_precision="same")
        ingest_directory(None, settings, embedder=embedder, progress=False)
        retriever = HybridRetriever(settings)
        hits: dict[str, list[bool]] = defaultdict(list)
        by_kind: dict[str, list[bool]] = defaultdict(list)
        misses = []
        for task in tasks:
            gold = set(task["gold_document_ids"])
            pairs = [(u, a) for u, a in task["history"]]
            rewrite = asyncio.run(rewrite_query(task["question"], pairs, "join", None))
            query = _settled(retriever, embedder, rewrite, task["question"])
            hit = _hit(retriever, embedder, query, gold, k)
            hits["rewritten"].append(hit)
            by_kind[task.get("kind", "?")].append(hit)
            hits["alone"].append(_hit(retriever, embedder, task["question"], gold, k))
            hits["standalone"].append(_hit(retriever, embedder, task["standalone"], gold, k))
            if not hit:
                misses.append({"question": task["question"], "query": query, "gold": sorted(gold)})
    share = {name: round(sum(v) / len(v), 3) for name, v in hits.items()}
    return {
        "tasks": len(tasks),
        f"hit@{k}": share,
        "rewritten_by_kind": {kind: f"{sum(v)}/{len(v)}" for kind, v in sorted(by_kind.items())},
        "misses": misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=Path, default=TASKS)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.tasks, args.k), indent=1))


if __name__ == "__main__":
    main()
