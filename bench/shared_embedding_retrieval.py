"""Retrieval with the guard model's shared-pass query embedding vs the retrieval embedder's own (issue 17 item 4).

The guard graph (app/guard/guard_model.py) also gives the query embedding: the pretrained bottom layers, then
the pretrained top layers, all with int8 weights and at f32. Documents stay embedded by the retrieval embedder.
This measures what that costs retrieval: cosine between the two query vectors, and hybrid / dense recall@5 on
every task set in tests/data, each query embedded both ways against the same index.

    python -m bench.shared_embedding_retrieval [--guard-dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

from app.eval.retrieval import rank_metrics
from app.guard.guard_model import GUARD_MODEL_DIR, GuardModel, SharedPassEmbedder
from app.rag.retrieve import HybridRetriever

TASK_FILES = ("rag_tasks.jsonl", "rag_tasks_hard_dev.jsonl", "rag_tasks_hard_test.jsonl", "rag_followups.jsonl")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def _tasks(path: Path) -> list[tuple[str, set[str]]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        question = row.get("standalone") or row.get("question")
        gold = row.get("gold_document_ids") or row.get("gold")
        if question and gold and not row.get("unanswerable"):
            out.append((str(question), set(gold if isinstance(gold, list) else [gold])))
    return out


def measure(retriever: Any, embedder: Any, shared: SharedPassEmbedder, tasks: list[tuple[str, set[str]]],
            k: int = 5) -> dict[str, Any]:
    questions, golds = [q for q, _ in tasks], [g for _, g in tasks]
    own, via_guard = embedder.embed(questions), shared.embed(questions)
    cosine = (own * via_guard).sum(axis=1)
    out: dict[str, Any] = {"tasks": len(tasks), "cosine_min": round(float(cosine.min()), 5),
                           "cosine_mean": round(float(cosine.mean()), 5)}
    for name, vectors in (("embedder", own), ("shared_pass", via_guard)):
        hybrid = [retriever.search(q, v, k)[0] for q, v in zip(questions, vectors, strict=True)]
        dense = [retriever.dense_search(v, k) for v in vectors]
        out[name] = {"hybrid_recall@5": round(rank_metrics(hybrid, golds, k)[f"recall@{k}"], 4),
                     "dense_recall@5": round(rank_metrics(dense, golds, k)[f"recall@{k}"], 4)}
    return out


def main() -> None:
    from app.rag.embedder import get_embedder
    from app.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guard-dir", type=Path, default=GUARD_MODEL_DIR)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    embedder = get_embedder()
    guard = GuardModel.load(args.guard_dir, threads=1)
    if not guard.shares_embedding:
        raise SystemExit(f"{args.guard_dir}: this guard graph has no embedding output")
    retriever = HybridRetriever(get_settings())
    report = {"machine": platform.processor() or platform.machine(),
              "sets": {name: measure(retriever, embedder, SharedPassEmbedder(guard, embedder), _tasks(DATA / name))
                       for name in TASK_FILES if (DATA / name).exists()}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
