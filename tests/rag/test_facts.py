"""The facts an answer sentence must take from its sources (app/rag/facts.py), on the shipped wire-transfer article."""

from __future__ import annotations

import pytest

from app.rag.facts import extract, unsupported_facts
from app.settings import PROJECT_ROOT

WIRES = (PROJECT_ROOT / "knowledge" / "wire-transfers.md").read_text(encoding="utf-8")
CONTACT = "You can reach Larkspur Bank support at 1-800-555-0142 or visit any branch."


def _missing(sentence: str, *known: str) -> list[str]:
    texts = "\n".join([WIRES, *known])
    return unsupported_facts(sentence, extract(texts, source=True), texts.lower())


@pytest.mark.parametrize(
    "sentence",
    [
        "An international wire costs $45 [1].",
        "An international wire costs 45 dollars.",
        "International wires usually arrive in 1-5 business days.",  # the article writes 1–5
        "International wires arrive in 1 to 5 business days.",
        "Submit a domestic wire by 4 pm ET to send it the same day.",  # the article: 4:00 p.m. ET
        "You can wire up to $50,000 per day in the app.",
        "You can wire up to $50k per day in the app.",
        CONTACT,  # the configured contact line is trusted
        "A recall request costs twenty dollars.",
        "One of our bankers can help you in a branch.",  # "one" is no count here
        "Before you send a wire:\n\n8.",  # a window that ends on a list marker (no 8 in the article)
        "1. Open Transfers.\n2) Choose Wire and submit it by 4 pm ET.\n 12. Confirm.",
        "In the app, tap **Transfers > Wire transfer** and fill in the form.",  # a screen the article names
        'Go to "Transfers > Activity" to follow it.',
    ],
)
def test_facts_the_sources_state_pass_in_any_format(sentence: str) -> None:
    assert _missing(sentence, CONTACT) == []


@pytest.mark.parametrize(
    ("sentence", "fact"),
    [
        ("Domestic wires arrive within 2-3 business days, while international wires take up to 10 days.", "10"),
        ("An international wire costs $35.", "$35"),
        ("Outgoing international wires cost 3% of the amount.", "3%"),
        ("Submit international wires by 5 pm ET.", "17:00"),
        ("Wires are covered by the Larkspur Wire Guarantee.", "Wire Guarantee"),
        ("It usually arrives within forty business days.", "40"),
        ("Call our wire desk at 1-800-555-0199.", "8005550199"),
        ("1. Wires of up to 7. million dollars go out the same day.", "7"),
        ("Steps:\n1. Note the fee of $60.", "$60"),
        ('2. Navigate to the "Stocks" section and choose a share.', "Stocks"),  # a screen no source names
        ("Tap **Wire Express** to send it faster.", "Wire Express"),
    ],
)
def test_a_fact_no_source_states_is_named(sentence: str, fact: str) -> None:
    assert fact in " ".join(_missing(sentence, CONTACT))


def test_a_screen_the_customer_names_must_still_be_in_the_sources() -> None:
    question = "how do i buy stocks in the larkspur app"
    sentence = '2. Navigate to the "Stocks" section and choose a share.'
    texts = "\n".join([WIRES, question])
    assert unsupported_facts(sentence, extract(texts, source=True), texts.lower(), WIRES.lower()) == ["Stocks"]
    assert unsupported_facts("Tap **Transfers > Wire transfer**.", extract(texts, source=True), texts.lower(),
                             WIRES.lower()) == []


def test_the_customers_own_figures_may_be_repeated() -> None:
    sentence = "For a $3,000 wire, the international fee is still $45."
    assert _missing(sentence) == ["$3000"]
    assert _missing(sentence, "I need to send $3,000 to my sister in Spain, what does it cost?") == []
