"""The customer-style RAG task set (tests/data/rag_conversations_{dev,test}.jsonl) stays well-formed: a fixed sha1
split, known kinds and gold documents, and every expected fact findable where the answer must come from (a gold
document, or for a question about the conversation the earlier turns)."""

from __future__ import annotations

import json

import pytest

from app.eval.rag_turns import KINDS, is_scored, normalise, split_of
from app.settings import PROJECT_ROOT

DATA = PROJECT_ROOT / "tests" / "data"
KNOWLEDGE = PROJECT_ROOT / "knowledge"


def _rows(half: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (DATA / f"rag_conversations_{half}.jsonl").read_text().splitlines() if line]


@pytest.mark.parametrize("half", ["dev", "test"])
def test_split_kinds_and_expected_facts(half: str) -> None:
    documents = {p.stem: normalise(p.read_text()) for p in KNOWLEDGE.glob("*.md") if p.stem != "README"}
    rows = _rows(half)
    assert len(rows) >= 40
    for row in rows:
        assert split_of(row) == half, row
        assert row["kind"] in KINDS, row
        assert is_scored(row["turns"][-1]), row  # the last turn is what the task measures
        said = ""
        for turn in row["turns"]:
            gold = turn.get("gold_document_ids") or []
            assert set(gold) <= set(documents), turn
            if turn.get("unanswerable"):
                assert not gold and not turn.get("answer_contains"), turn
            elif turn.get("answer_contains"):
                assert gold or turn.get("from") == "conversation", turn
                where = " ".join(documents[d] for d in gold) + " " + said
                for item in turn["answer_contains"]:
                    alternatives = [item] if isinstance(item, str) else item
                    assert any(normalise(a) in where for a in alternatives), (item, turn["user"])
            said += " " + normalise(turn["user"])


def test_halves_are_disjoint_and_cover_every_kind() -> None:
    dev, test = _rows("dev"), _rows("test")
    assert not {json.dumps(r["turns"]) for r in dev} & {json.dumps(r["turns"]) for r in test}
    for rows in (dev, test):
        assert {r["kind"] for r in rows} == set(KINDS)
