from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.eval.retrieval import eval_rag
from app.llm.client import OpenAICompatClient
from app.llm.llamacpp import LlamaCppClient
from app.rag.embedder import MiniLMEmbedder
from app.settings import PROJECT_ROOT
from tests.rag.conftest import make_settings, write_corpus

TASKS = [
    {"question": "How much is an outgoing domestic wire?", "gold_document_ids": ["wires"], "answer_contains": ["$25"]},
    {
        "question": "How fast does a replacement debit card arrive?",
        "gold_document_ids": ["cards"],
        "answer_contains": ["5"],
    },
    {"question": "What APY does Saver Plus earn?", "gold_document_ids": ["savings"], "answer_contains": ["3.10%"]},
    {"question": "Does the bank offer pet insurance?", "gold_document_ids": [], "unanswerable": True},
]
CONTEXTS = [
    {
        "question": "When was the Eiffel Tower finished?",
        "answerable": True,
        "context": "The Eiffel Tower in Paris was finished in 1889 for the World's Fair.",
    },
    {
        "question": "Who designed the Eiffel Tower's elevators in 1850?",
        "answerable": False,
        "context": "The Eiffel Tower in Paris was finished in 1889 for the World's Fair.",
    },
    {
        "question": "What is the capital of Australia?",
        "answerable": True,
        "context": "Canberra is the capital city of Australia.",
    },
    {
        "question": "What is the population of Canberra on Mars?",
        "answerable": False,
        "context": "Canberra is the capital city of Australia, planned from 1913.",
    },
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_rag_small_corpus_with_generation(tmp_path: Path, embedder: MiniLMEmbedder, embedded_llm_url: str) -> None:
    settings = make_settings(tmp_path)
    write_corpus(settings.knowledge_dir)

    def llm() -> OpenAICompatClient:
        return LlamaCppClient(embedded_llm_url, "smollm2-135m", timeout_s=60)

    report = eval_rag(
        _jsonl(tmp_path / "tasks.jsonl", TASKS),
        settings,
        embedder=embedder,
        k=3,
        llm=llm,
        unanswerable_path=_jsonl(tmp_path / "ctx.jsonl", CONTEXTS),
        unanswerable_limit=4,
    )
    assert report["answerable_tasks"] == 3 and report["unanswerable_tasks"] == 1
    assert report["hybrid"]["recall@3"] == 1.0 and report["hybrid"]["mrr"] == 1.0
    assert report["dense"]["recall@3"] == 1.0
    assert report["off_domain_abstention"] == 1.0  # Eiffel/Canberra questions retrieve nothing from the bank
    assert report["contexts"]["answerable"]["n"] == report["contexts"]["unanswerable"]["n"] == 2
    assert report["contexts"]["answerable"]["retrieval_abstention"] == 0.0
    assert len(report["threshold_sweep"]) >= 5
    generation = report["generation"]
    assert set(generation) >= {"citation_validity", "citation_precision", "answer_accuracy", "idk_rate_unanswerable"}
    assert 0.0 <= generation["answer_accuracy"] <= 1.0
    assert "idk_rate" in report["contexts"]["unanswerable"]
    # The real index of the data dir was used; the contexts went into a separate, temporary one.
    assert not any("context" in p.name for p in settings.knowledge_dir.iterdir())


@pytest.mark.slow
def test_recall_on_the_demo_knowledge_base(
    embedder: MiniLMEmbedder, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tasks = PROJECT_ROOT / "tests" / "data" / "rag_tasks.jsonl"
    knowledge = PROJECT_ROOT / "knowledge"
    if not tasks.exists() or not any(knowledge.glob("*.md")):
        pytest.fail("tests/data/rag_tasks.jsonl and knowledge/*.md are part of the repo")
    # The index is cached between runs: ingest is incremental, so later runs only hash the files.
    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    cache_dir = Path(cache.mkdir("rag-demo-index")) if cache is not None else tmp_path_factory.mktemp("rag-demo")
    settings = make_settings(cache_dir).model_copy(update={"knowledge_dir": knowledge, "rag_score_threshold": 0.3})
    report = eval_rag(tasks, settings, embedder=embedder, k=5, unanswerable_path=None)
    assert report["answerable_tasks"] >= 30
    assert report["hybrid"]["recall@5"] >= 0.8, report["misses"]
    assert report["hybrid"]["mrr"] >= 0.6
