"""The explicit dev/held-out split: stable, about the documented share, and never trained on.

The checks on the real dev sets use the `eval_dir` fixture (conftest.py: ../shared/eval beside the clone,
skipped when absent, a failure under CI=true); the split function itself is tested on made-up rows."""

from __future__ import annotations

import json
from pathlib import Path

from app.eval.holdout import HOLDOUT_SHARE, holdout_rows, is_holdout, write_samples
from training.train_data import SLOT, heldout_texts, load_sources


def test_split_is_a_pure_function_of_the_normalised_text() -> None:
    texts = [f"made-up request number {i}" for i in range(4000)]
    held = [t for t in texts if is_holdout("harmful_dev.jsonl", t)]
    assert abs(len(held) / len(texts) - HOLDOUT_SHARE["harmful_dev.jsonl"]) < 0.03
    assert all(is_holdout("harmful_dev.jsonl", "  " + t.upper() + " ") for t in held)  # case/space-insensitive
    assert not any(is_holdout("unknown.jsonl", t) for t in texts)  # files without a share are all training
    # Different files use different slices: the same text is not held out everywhere at once.
    assert {is_holdout("benign_dev.jsonl", t) for t in held} == {True, False}


def test_samples_come_from_the_held_out_side_only(eval_dir: Path, tmp_path: Path) -> None:
    counts = {name: 30 for name in HOLDOUT_SHARE}
    written = write_samples(eval_dir, tmp_path, counts, seed=7)
    for name in HOLDOUT_SHARE:
        rows = [json.loads(line) for line in (tmp_path / f"holdout_{name}").read_text().splitlines()]
        assert len(rows) == written[name] == min(30, len(holdout_rows(eval_dir, name))) > 0
        assert all(is_holdout(name, r["text"]) for r in rows)
        assert len({r["text"] for r in rows}) == len(rows)
    again = tmp_path / "again"
    write_samples(eval_dir, again, counts, seed=7)
    assert (again / "holdout_harmful_dev.jsonl").read_text() == (tmp_path / "holdout_harmful_dev.jsonl").read_text()


def test_training_never_sees_a_held_out_row(eval_dir: Path) -> None:
    import random

    sources = load_sources(eval_dir, random.Random(0), None)
    # Rows read from the dev files (our own written rows may coincide with a chit-chat line like "who are
    # you?": train() drops those as near-duplicates of held-out rows, cosine 1.0 >= NEAR_DUPLICATE).
    dev_sources = ("harmful", "borderline", "template", "injection", "chitchat")
    trained = {" ".join(it.text.lower().split()) for s in dev_sources for it in sources[s]}
    held = {" ".join(SLOT.sub("", t).lower().split()) for t in heldout_texts(eval_dir)}
    assert len(held) > 400
    assert not trained & held
    assert len(sources["harmful"]) > 900 and len(sources["template"]) > 450  # the rest still trains
