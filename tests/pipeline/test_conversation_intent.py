"""The nearest-example test for questions about the conversation (app/pipeline/conversation_intent.py), on the
vectors a turn really has (the guard model's shared pass), measured on a set its examples' authors never saw."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.pipeline.context import is_about_conversation
from app.pipeline.conversation import about_conversation
from app.pipeline.conversation_intent import VECTORS, examples_sha256, read_examples, shipped_intent

DATA = Path(__file__).resolve().parents[1] / "data"
HISTORY = [{"role": "user", "content": "how much is a wire?"}, {"role": "assistant", "content": "$45 [1]"}]


@pytest.fixture(scope="module")
def turn_embedder(embedder: Any) -> Any:
    """What embeds a turn's message in the server: the guard model's shared pass (app/main.py)."""
    from app.guard.detector import load_classifier
    from app.main import query_embedder

    return query_embedder(load_classifier("finetuned"), embedder) or embedder


def test_the_shipped_vectors_are_those_of_the_shipped_examples(embedder: Any) -> None:
    with np.load(VECTORS) as npz:
        assert str(npz["sha256"]) == examples_sha256(), "examples changed: python -m app.pipeline.conversation_intent"
        stored, about = npz["vectors"].astype(np.float32), npz["about"]
    rows = read_examples()
    assert len(rows) == len(stored) and about.tolist() == [r["about_conversation"] for r in rows]
    sample = list(range(0, len(rows), 33))
    live = embedder.embed([str(rows[i]["text"]) for i in sample])  # the server's int8 embedder vs the fp32 file
    cosines = np.sum(live * stored[sample], axis=1) / np.linalg.norm(stored[sample], axis=1)
    assert cosines.min() > 0.97


def test_an_independent_set_is_told_apart_better_than_by_the_phrases(turn_embedder: Any) -> None:
    """tests/data/conversation_intent.jsonl (150 messages about the conversation, 150 that borrow their words),
    written by an author who saw neither the phrases nor the examples. Measured (session 17): the phrases alone
    recognise 63.3% and take 1 of the others; with the nearest examples 97.3% and 2 ("ok and whats the max
    amount")."""
    rows = [json.loads(line) for line in (DATA / "conversation_intent.jsonl").read_text().splitlines() if line]
    vectors = turn_embedder.embed([r["text"] for r in rows])
    said = [is_about_conversation(r["text"], HISTORY, v) for r, v in zip(rows, vectors, strict=True)]
    about = [s for s, r in zip(said, rows, strict=True) if r["about_conversation"]]
    other = [s for s, r in zip(said, rows, strict=True) if not r["about_conversation"]]
    phrases = [about_conversation(r["text"]) for r in rows if r["about_conversation"]]
    assert sum(about) / len(about) >= 0.95 > sum(phrases) / len(phrases)
    assert sum(other) <= 3


def test_bank_messages_of_our_task_sets_stay_knowledge_base_questions(turn_embedder: Any) -> None:
    """Every customer message of our RAG sets but the conversation tasks' last turns, at most 0.3% taken. Measured:
    1 of 578 (session 17: "Where do I forward a sketchy email pretending to be Larkspur?"); 4 of 1,007 since the blind
    task sets (session 21; "where do i forward a phishing email" by 0.0003 over the margin); 0 of 1,007 since the
    bank questions shaped like comparisons, steps, amounts and "where do I send" joined the examples (session 22)."""
    texts: set[str] = set()
    for path in DATA.glob("rag_*.jsonl"):
        for task in map(json.loads, path.read_text().splitlines()):
            if "turns" in task:
                turns = task["turns"][:-1] if task["kind"] == "conversation" else task["turns"]
                texts.update(t["user"] for t in turns)
            else:
                texts.add(task["question"])
    ordered = sorted(texts)
    vectors = turn_embedder.embed(ordered)
    taken = [t for t, v in zip(ordered, vectors, strict=True) if is_about_conversation(t, HISTORY, v)]
    assert len(ordered) > 1000 and len(taken) <= 0.003 * len(ordered), taken


def test_without_history_nothing_is_about_the_conversation(turn_embedder: Any) -> None:
    vector = turn_embedder.embed(["go back to the part about the steps"])[0]
    assert is_about_conversation("go back to the part about the steps", HISTORY, vector)
    assert not is_about_conversation("go back to the part about the steps", [], vector)


def test_vectors_of_another_model_leave_the_phrases_alone() -> None:
    """Another embedding size (another model): the examples cannot be compared, the phrases still decide."""
    assert shipped_intent(768) is None
    assert is_about_conversation("can you say that again?", HISTORY, np.ones(768) / np.sqrt(768))
    assert not is_about_conversation("go back to the part about the steps", HISTORY, np.ones(768) / np.sqrt(768))
