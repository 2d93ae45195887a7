"""Passage selection (app/rag/passages.py) with the real BM25 statistics of a small corpus and the real prompt chain."""

from __future__ import annotations

from app.rag.base import Chunk
from app.rag.bm25 import Bm25Matrix
from app.rag.chain import build_messages, extract_citations, source_heading
from app.rag.passages import fit_passages, split_units

SYSTEM = "You are Larkspur Bank's assistant."
FEES = """Fees for wires and transfers are listed below.

| Item | Fee |
|---|---|
| Outgoing domestic wire | $25 |
| Incoming domestic wire | $0 |
| Outgoing international wire | $45 |
| Wire trace or recall | $20 |
| Stop payment | $30 |
| Money order | $5 |
| Cashier's check | $10 |
| Paper statements | $2 per month |

Premier Checking customers pay no wire fees."""
TIMING = (
    "Send wires from the app under Transfers. Domestic wires sent before 4 p.m. ET arrive the same business day. "
    "International wires usually take 1 to 5 business days. It depends on the receiving bank's country. "
    "You can track a wire in the app."
)
CARDS = "You can lock your card in the app. Locking stops new purchases. Replacement cards arrive in 5 to 7 days."


def _chunk(n: int, content: str, title: str, section: str = "") -> Chunk:
    return Chunk(id=f"doc{n}#0:x", document_id=f"doc{n}", source=f"doc{n}.md", title=title, content=content,
                 section=section, score=0.6 - n / 100)  # fmt: skip


CHUNKS = [_chunk(1, FEES, "Fee Schedule", "Wires"), _chunk(2, TIMING, "Wire Transfers"), _chunk(3, CARDS, "Cards")]
IDF = Bm25Matrix.build([c.content for c in CHUNKS]).idf


def test_units_are_sentences_and_table_rows_with_their_header() -> None:
    units = split_units(FEES)
    texts = [u.text for u in units]
    assert "|---|---|" not in texts  # the separator row carries nothing
    header = texts.index("| Item | Fee |")
    assert units[texts.index("| Outgoing international wire | $45 |")].header == header
    assert units[header].header is None
    assert split_units(TIMING)[1].text == "Domestic wires sent before 4 p.m. ET arrive the same business day."


def test_a_fee_question_gets_its_table_row_with_the_header_first() -> None:
    question = "How much is an outgoing international wire?"
    picked = fit_passages(CHUNKS, question, heading=source_heading, idf=IDF, min_tokens=40, max_tokens=40)
    fees = picked.texts[0]
    assert picked.chunks[0] is CHUNKS[0]
    assert "| Item | Fee |\n" in fees and "| Outgoing international wire | $45 |" in fees
    assert "Money order" not in fees and "Paper statements" not in fees  # a tight budget: the row asked about first
    assert CHUNKS[2] not in picked.chunks  # nor does the card chunk
    assert picked.tokens <= picked.budget
    # Never cut mid-unit: every line of an excerpt is a whole sentence/row of its chunk, or the omission mark.
    for chunk, text in zip(picked.chunks, picked.texts, strict=True):
        for piece in text.replace(" … ", "\n").splitlines():
            assert piece == "…" or piece in chunk.content


def test_a_kept_sentence_brings_the_one_it_refers_back_to_and_figures_the_question_wants() -> None:
    picked = fit_passages(CHUNKS, "how long do international wires take?", heading=source_heading, idf=IDF)
    timing = picked.texts[picked.chunks.index(CHUNKS[1])]
    assert (
        "International wires usually take 1 to 5 business days. It depends on the receiving bank's country." in timing
    )
    assert CHUNKS[2] not in picked.chunks  # the card chunk answers nothing here


def test_the_budget_adapts_to_the_question() -> None:
    short = fit_passages(CHUNKS, "wire trace fee", heading=source_heading, idf=IDF)
    long = fit_passages(
        CHUNKS, "How do I send an international wire from the app and what does it cost me as a Premier customer?",
        heading=source_heading, idf=IDF,
    )  # fmt: skip
    assert short.budget < long.budget
    assert short.tokens < long.tokens


def test_a_sentence_shared_by_overlapping_chunks_is_given_once() -> None:
    overlap = _chunk(4, "International wires usually take 1 to 5 business days. Fees apply.", "Wire Transfers")
    picked = fit_passages([CHUNKS[1], overlap], "international wires days", heading=source_heading, idf=IDF)
    assert "\n".join(picked.texts).count("International wires usually take 1 to 5 business days.") == 1


def test_sources_are_renumbered_and_citations_map_to_the_right_chunk() -> None:
    question = "What do I pay to send a wire abroad, an outgoing international wire?"
    chunks = [CHUNKS[2], CHUNKS[0]]  # the card chunk ranks first but says nothing about wires
    prepared = build_messages(question, [], chunks, system_prompt=SYSTEM, context_tokens=900, fit="passages", idf=IDF)
    system = prepared.messages[0]["content"]
    assert prepared.sources == [CHUNKS[0]]
    assert "[1] Fee Schedule — Wires\n" in system and "[2]" not in system.split("Sources:")[1]
    cited = extract_citations("An outgoing international wire costs $45 [1].", prepared.sources)
    assert [c["document_id"] for c in cited] == ["doc1"]
    assert cited[0]["snippet"].startswith("Fees for wires")  # the citation shows the chunk, not the excerpt


def test_instructions_stay_a_fixed_prefix_and_chunks_mode_is_unchanged() -> None:
    one = build_messages("wire trace fee", [], CHUNKS, system_prompt=SYSTEM, context_tokens=900, fit="passages")
    two = build_messages("lock my card", [], CHUNKS, system_prompt=SYSTEM, context_tokens=900, fit="passages")
    first, second = one.messages[0]["content"], two.messages[0]["content"]
    assert first[: first.index("Sources:")] == second[: second.index("Sources:")]
    assert first != second
    whole = build_messages("wire trace fee", [], CHUNKS, system_prompt=SYSTEM, context_tokens=900)
    assert all(c.content in whole.messages[0]["content"] for c in CHUNKS)


def test_a_follow_up_uses_the_previous_question_for_its_subject() -> None:
    history = [
        {"role": "user", "content": "How much does an outgoing international wire cost?"},
        {"role": "assistant", "content": "$45 [1]."},
    ]
    prepared = build_messages(
        "and how long does it take?", history, CHUNKS, system_prompt=SYSTEM, context_tokens=900, fit="passages",
        idf=IDF,
    )  # fmt: skip
    assert "International wires usually take 1 to 5 business days." in prepared.messages[0]["content"]


def test_idf_weighs_rare_and_unknown_terms_most() -> None:
    common, rare, unknown = IDF("wire"), IDF("lock"), IDF("zebra")
    assert 0 < common < rare < unknown
