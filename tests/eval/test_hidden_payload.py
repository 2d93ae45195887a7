"""The hidden-payload probe (app/eval/hidden_payload.py): its cases are a fair test of the guard — every payload inside
the window the guard reads, every kind at every place in both kinds of prose, the same cases on every run."""

from __future__ import annotations

from app.eval.hidden_payload import BENIGN, PAYLOADS, PLACES, build_cases
from app.guard.guard_model import (
    GUARD_MODEL_DIR,
    MAX_TOKENS,
    TOKENIZER_FILE,
    encode_ids,
    in_window,
    load_tokenizer,
)


def test_cases_cover_every_kind_place_and_prose_with_the_payload_in_view() -> None:
    cases = build_cases()
    assert cases == build_cases()
    cells = {(c["category"], c["place"], c["prose"]) for c in cases}
    assert cells == {(k, p, s) for k in PAYLOADS + BENIGN for p in PLACES for s in ("knowledge", "packages")}
    tokenizer = load_tokenizer(GUARD_MODEL_DIR / TOKENIZER_FILE)
    assert all(c["payload"] in c["text"] and in_window(tokenizer, c["text"], c["payload"]) for c in cases)
    cut = [c for c in cases if len(tokenizer.encode(c["text"]).ids) > MAX_TOKENS]
    assert len(cut) > len(cases) // 10, "the prose must also make texts longer than the guard's window"
    assert all(len(encode_ids(tokenizer, [c["text"]])[0]) == MAX_TOKENS for c in cut)
