"""The hard retrieval task set (tests/data/rag_tasks_hard_{dev,test}.jsonl) stays well-formed and keeps its
fixed split: a question belongs to dev iff sha1(question) is even, so nothing moves from test to dev."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.settings import PROJECT_ROOT

DATA = PROJECT_ROOT / "tests" / "data"


@pytest.mark.parametrize(("half", "parity"), [("dev", 0), ("test", 1)])
def test_hard_tasks_split_and_gold_ids(half: str, parity: int) -> None:
    documents = {p.stem for p in (PROJECT_ROOT / "knowledge").glob("*.md")} - {"README"}
    rows = [json.loads(line) for line in (DATA / f"rag_tasks_hard_{half}.jsonl").read_text().splitlines() if line]
    assert len(rows) >= 40
    for row in rows:
        assert int(hashlib.sha1(row["question"].encode()).hexdigest(), 16) % 2 == parity, row["question"]
        assert row["gold_document_ids"] and set(row["gold_document_ids"]) <= documents, row
    other = "test" if half == "dev" else "dev"
    other_questions = {json.loads(line)["question"] for line in (DATA / f"rag_tasks_hard_{other}.jsonl").open()}
    assert not other_questions & {r["question"] for r in rows}
