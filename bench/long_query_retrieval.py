"""Retrieval on long, paragraph-style messages beside short questions (issue 18, item 6): hybrid vs dense vs BM25.

    .venv/bin/python -m bench.long_query_retrieval [--sets dev|test|all] [--distractors FILE] [--chunk-chars N]

Every task set is searched the way /v1/search and the eval search it: the message's own embedding and text into
`HybridRetriever.search` (threshold on), beside plain dense (`dense_search`) and plain BM25 (`keyword_search`)
over the same index. Metrics, over the answerable tasks:

    h1 / h3 / h5   a gold document among the top 1 / 3 / 5 chunks (h3: what the prompt gets at rag_top_k = 3)
    a3 / a5        a chunk of a gold document holding every `answer_contains` string among the top 3 / 5
                   (stricter: the right passage, not only the right page; tasks with answer strings only)

`--distractors FILE` adds the distinct `context` paragraphs of a JSONL file (e.g. ../shared/eval/
unanswerable_dev.jsonl: 299 Wikipedia paragraphs) as extra documents, so keyword matches on a story's
details ("wedding", "Japan", "car") have somewhere to go. Only APIs that predate the long-message change, so the
same script measures an older checkout (run it from that checkout's root).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.rag.base import Chunk
from app.rag.embedder import get_embedder
from app.rag.ingest import ingest_directory
from app.rag.retrieve import HybridRetriever
from app.settings import PROJECT_ROOT, Settings

DATA = PROJECT_ROOT / "tests" / "data"
SETS = {
    "dev": ["rag_tasks", "rag_tasks_hard_dev", "rag_tasks_long_dev", "rag_tasks_blind_dev"],
    "test": ["rag_tasks_hard_test", "rag_tasks_long_test", "rag_tasks_blind_test"],
}
SETS["all"] = SETS["dev"] + SETS["test"]


def _tasks(name: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return [t for t in rows if t.get("gold_document_ids") and not t.get("unanswerable")]


def _holds_answer(chunk: Chunk, task: dict[str, Any]) -> bool:
    text = chunk.content.lower()
    return chunk.document_id in task["gold_document_ids"] and all(a.lower() in text for a in task["answer_contains"])


def metrics(ranked: list[list[Chunk]], tasks: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in (1, 3, 5):
        hits = [
            any(c.document_id in t["gold_document_ids"] for c in cs[:k]) for cs, t in zip(ranked, tasks, strict=True)
        ]
        out[f"h{k}"] = round(sum(hits) / len(hits), 3)
    with_answers = [(cs, t) for cs, t in zip(ranked, tasks, strict=True) if t.get("answer_contains")]
    for k in (3, 5):
        hits = [any(_holds_answer(c, t) for c in cs[:k]) for cs, t in with_answers]
        out[f"a{k}"] = round(sum(hits) / max(len(hits), 1), 3)
    return out


def _knowledge_dir(tmp: Path, distractors: Path | None) -> Path:
    if distractors is None:
        return PROJECT_ROOT / "knowledge"
    kb = tmp / "knowledge"
    kb.mkdir()
    for path in (PROJECT_ROOT / "knowledge").glob("*.md"):
        shutil.copy(path, kb / path.name)
    contexts = dict.fromkeys(json.loads(line)["context"] for line in distractors.open(encoding="utf-8") if line.strip())
    for i, context in enumerate(contexts):
        (kb / f"zz-distractor-{i:03d}.md").write_text(f"# Article {i}\n\n{context}\n", encoding="utf-8")
    return kb


def run(set_names: list[str], distractors: Path | None, chunk_chars: int | None) -> dict[str, Any]:
    embedder = get_embedder()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings(
            data_dir=tmp / "data", knowledge_dir=_knowledge_dir(tmp, distractors), embed_ingest_precision="same"
        )
        if chunk_chars:
            settings.rag_chunk_chars = chunk_chars
        ingest_directory(None, settings, embedder=embedder, progress=False)
        retriever = HybridRetriever(settings)
        report["chunks"] = len(retriever.snapshot)
        for name in set_names:
            tasks = _tasks(name)
            questions = [t["question"] for t in tasks]
            vectors = embedder.embed(questions)
            report[name] = {
                "tasks": len(tasks),
                "hybrid": metrics(
                    [retriever.search(q, v, 5)[0] for q, v in zip(questions, vectors, strict=True)], tasks
                ),
                "dense": metrics([retriever.dense_search(v, 5) for v in vectors], tasks),
                "bm25": metrics([retriever.keyword_search(q, 5) for q in questions], tasks),
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", choices=sorted(SETS), default="dev")
    parser.add_argument("--distractors", type=Path, default=None)
    parser.add_argument("--chunk-chars", type=int, default=None)
    args = parser.parse_args()
    report = run(SETS[args.sets], args.distractors, args.chunk_chars)
    print(json.dumps(report, indent=1))
    for name, entry in report.items():
        if isinstance(entry, dict):
            for retriever in ("hybrid", "dense", "bm25"):
                cells = " / ".join(f"{v:.3f}" for v in entry[retriever].values())
                print(f"| {name} ({entry['tasks']}) | {retriever} | {cells} |")


if __name__ == "__main__":
    main()
