"""The blind retrieval task set (tests/data/rag_tasks_blind_{dev,test}.jsonl): customer questions written from the
knowledge base by authors who saw no other task set and no retrieval result. It stays well-formed and keeps its fixed
split (dev iff sha1(question) is even); each answer string is verbatim in the first gold document."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.settings import PROJECT_ROOT

DATA = PROJECT_ROOT / "tests" / "data"
STYLES = {"short", "casual", "indirect", "alarming", "long", "compare", "paraphrase", "detail", "confusable"}


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.parametrize(("half", "parity"), [("dev", 0), ("test", 1)])
def test_blind_tasks_split_gold_ids_and_answers(half: str, parity: int) -> None:
    documents = {p.stem: p.read_text(encoding="utf-8") for p in (PROJECT_ROOT / "knowledge").glob("*.md")}
    documents.pop("README", None)
    rows = _rows(f"rag_tasks_blind_{half}")
    assert len(rows) >= 200
    for row in rows:
        question = row["question"]
        assert int(hashlib.sha1(question.encode()).hexdigest(), 16) % 2 == parity, question
        assert row["gold_document_ids"] and set(row["gold_document_ids"]) <= set(documents), row
        assert row["style"] in STYLES, row
        first = documents[row["gold_document_ids"][0]]
        assert all(answer in first for answer in row["answer_contains"]), row
    other = "test" if half == "dev" else "dev"
    assert not {r["question"] for r in _rows(f"rag_tasks_blind_{other}")} & {r["question"] for r in rows}
    others = {
        r["question"]
        for name in (
            "rag_tasks",
            "rag_tasks_hard_dev",
            "rag_tasks_hard_test",
            "rag_tasks_long_dev",
            "rag_tasks_long_test",
        )
        for r in _rows(name)
    }
    assert not others & {r["question"] for r in rows}
