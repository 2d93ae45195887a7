"""RAG eval end to end: retrieval metrics (app.eval.retrieval) + answers through a running server, with the
LLM-as-judge on the configured (embedded SmolLM2) model."""

from __future__ import annotations

import json
from pathlib import Path

from app.eval.data import DEFAULT_RAG_TASKS
from app.eval.rag import is_unanswerable
from app.eval.runner import run_rag_eval
from app.settings import Settings
from tests.fixtures.server import LiveServer


def test_rag_eval_via_server_with_judge(base_settings: Settings, eval_server: LiveServer, tmp_path: Path) -> None:
    tasks = [json.loads(line) for line in DEFAULT_RAG_TASKS.read_text().splitlines() if line.strip()]
    picked = [t for t in tasks if not is_unanswerable(t)][:3] + [
        {"question": "What was the population of Byzantium in the year 600?", "gold_document_ids": [],
         "unanswerable": True}]
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in picked))
    out = tmp_path / "rag"
    report = run_rag_eval([data], base_settings, server=eval_server.url, out_dir=out, k=5, judge=True)

    retrieval = report["retrieval"]
    assert retrieval["answerable_tasks"] == 3 and retrieval["unanswerable_tasks"] == 1
    assert 0.0 <= retrieval["hybrid"]["recall@5"] <= 1.0 and 0.0 <= retrieval["hybrid"]["mrr"] <= 1.0
    answers = report["answers"]
    assert answers["answerable"] == 3 and answers["unanswerable"] == 1
    assert answers["idk_rate_unanswerable"] in (0.0, 1.0)
    assert answers["judge_correctness"] is not None and 0.0 <= answers["judge_correctness"] <= 1.0
    assert len(answers["examples"]) == 3
    stored = json.loads((out / "rag.json").read_text())
    assert stored["retrieval"]["hybrid"] == retrieval["hybrid"]
    markdown = (out / "rag.md").read_text()
    assert "recall@k" in markdown and "citation precision" in markdown and "rag_metrics.png" in markdown
    assert "| bm25 |" in markdown and "| dense |" in markdown  # plain BM25 and plain dense beside hybrid
    assert (out / "rag_metrics.png").read_bytes()[:4] == b"\x89PNG"
