"""The long, paragraph-style retrieval tasks (tests/data/rag_tasks_long_{dev,test}.jsonl) stay well-formed and keep
their fixed split: a message belongs to dev iff sha1(question) is even, so nothing moves from test to dev. Each is a
customer's paragraph (3+ sentences) with a question in it, and its answer strings occur in a gold document."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.rag.long_query import sentences, split_message
from app.settings import PROJECT_ROOT

DATA = PROJECT_ROOT / "tests" / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.parametrize(("half", "parity"), [("dev", 0), ("test", 1)])
def test_long_tasks_split_gold_ids_and_answers(half: str, parity: int) -> None:
    documents = {p.stem: p.read_text(encoding="utf-8").lower() for p in (PROJECT_ROOT / "knowledge").glob("*.md")}
    documents.pop("README", None)
    rows = _rows(f"rag_tasks_long_{half}")
    assert len(rows) >= 40
    for row in rows:
        question = row["question"]
        assert int(hashlib.sha1(question.encode()).hexdigest(), 16) % 2 == parity, question
        assert row["gold_document_ids"] and set(row["gold_document_ids"]) <= set(documents), row
        assert len(sentences(question)) >= 3, question
        assert split_message(question).split, question  # a question inside a story, not a bare question
        for answer in row["answer_contains"]:
            assert any(answer.lower() in documents[d] for d in row["gold_document_ids"]), (answer, row)
    other = "test" if half == "dev" else "dev"
    assert not {r["question"] for r in _rows(f"rag_tasks_long_{other}")} & {r["question"] for r in rows}
    others = {r["question"] for name in ("rag_tasks", "rag_tasks_hard_dev", "rag_tasks_hard_test") for r in _rows(name)}
    assert not others & {r["question"] for r in rows}
