from __future__ import annotations

import pytest

from app.rag.base import Chunk
from app.rag.embedder import MiniLMEmbedder
from app.rag.grounding import acheck_groundedness, check_groundedness, claim_sentences, fact_sentences

CHUNKS = [
    Chunk(
        "w#0:1",
        "wires",
        "wires.md",
        "Wire transfers",
        "Outgoing domestic wire transfers cost $25 each and must be "
        "submitted before 4 pm Eastern to be sent the same business day.",
        section="Domestic wires",
    ),
    Chunk(
        "c#0:1",
        "cards",
        "cards.md",
        "Card help",
        "You can lock your debit card instantly in the mobile app under Cards, then Lock card.",
        section="Lock your card",
    ),
]
SUPPORTED = (
    "Hello! A domestic wire costs $25 [1]. They must be submitted before 4 pm Eastern to go out the same business "
    "day [1]. You can also lock your debit card in the mobile app [2]. Let me know if you need anything else."
)
UNSUPPORTED = "A domestic wire costs $25 [1]. Every new customer also receives a free cruise to the Bahamas [1]."


def test_claim_sentences_skip_small_talk_citations_and_idk() -> None:
    text = "Hi there! Wires cost $25 each [1]. Thanks! I don't know. I couldn't find that in our knowledge base.\n- ok"
    assert claim_sentences(text) == ["Wires cost $25 each ."]


def test_list_markers_are_no_sentences_even_where_a_window_ends() -> None:
    """One marker pattern (app/rag/facts.py LIST_MARKER) for claims and facts: a hold-back window that ends right
    after a step's number ("...in the app:\n\n1.") has no "1." sentence to check."""
    window = "To lock it in the app:\n\n1. Tap **Cards**.\n2) Choose the card.\n- Turn on **Lock card**.\n\n3."
    assert fact_sentences(window) == ["To lock it in the app:", "Tap **Cards**.", "Choose the card.",
                                      "Turn on **Lock card**."]  # fmt: skip
    assert fact_sentences("* Express delivery costs $15.") == ["Express delivery costs $15."]


def test_supported_answer_is_allowed(embedder: MiniLMEmbedder) -> None:
    result = check_groundedness(SUPPORTED, CHUNKS, embedder, threshold=0.35)
    assert (result.name, result.verdict, result.score) == ("groundedness", "allow", 1.0)
    assert "3 claim(s)" in (result.detail or "")


def test_unsupported_sentence_is_flagged_or_blocked(embedder: MiniLMEmbedder) -> None:
    flagged = check_groundedness(UNSUPPORTED, CHUNKS, embedder, threshold=0.35)
    assert flagged.verdict == "flag" and flagged.score == 0.5
    assert "cruise" in (flagged.detail or "")
    blocked = check_groundedness(
        UNSUPPORTED,
        CHUNKS,
        embedder,
        threshold=0.35,
        action="block",
        chunk_embeddings=embedder.embed([c.content for c in CHUNKS]),
    )
    assert blocked.verdict == "block"
    assert check_groundedness("Sure, happy to help! I don't know.", [], embedder, threshold=0.35).verdict == "allow"
    assert check_groundedness(UNSUPPORTED, [], embedder, threshold=0.35).verdict == "flag"


@pytest.mark.parametrize("judge_says", [True, False])
async def test_judge_is_asked_only_for_low_scores(embedder: MiniLMEmbedder, judge_says: bool) -> None:
    asked: list[list[str]] = []

    async def judge(sentences: list[str], chunks: list[Chunk]) -> bool:
        asked.append(sentences)
        return judge_says

    ok = await acheck_groundedness(SUPPORTED, CHUNKS, embedder, threshold=0.35, judge=judge)
    assert ok.verdict == "allow" and asked == []
    low = await acheck_groundedness(UNSUPPORTED, CHUNKS, embedder, threshold=0.35, judge=judge)
    assert len(asked) == 1 and any("cruise" in s for s in asked[0])
    assert low.verdict == ("allow" if judge_says else "flag")


class _CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, inner: MiniLMEmbedder) -> None:
        self.inner, self.dim, self.texts = inner, inner.dim, 0

    def embed(self, texts: list[str]):  # type: ignore[no-untyped-def]
        self.texts += len(texts)
        return self.inner.embed(texts)


def test_sentences_restating_the_sources_need_no_embedding(embedder: MiniLMEmbedder) -> None:
    counting = _CountingEmbedder(embedder)
    answer = "Outgoing domestic wire transfers cost $25 each [1]. You can lock your debit card in the mobile app [2]."
    result = check_groundedness(answer, CHUNKS, counting, threshold=0.35)
    assert result.verdict == "allow" and counting.texts == 0
    assert "2 by wording" in (result.detail or "")
    # The invented sentence is not waved through by wording: it is embedded, and flagged.
    flagged = check_groundedness(UNSUPPORTED, CHUNKS, counting, threshold=0.35)
    assert flagged.verdict == "flag" and counting.texts >= 1


def test_a_number_missing_from_the_sources_is_never_supported_by_wording() -> None:
    from app.rag.grounding import _content_tokens, lexically_supported

    sources = set().union(*(_content_tokens(c.content) for c in CHUNKS))
    assert lexically_supported("Outgoing domestic wire transfers cost $25 each.", sources)
    assert not lexically_supported("Outgoing domestic wire transfers cost $45 each.", sources)
    assert not lexically_supported("Outgoing domestic wire transfers are free for premier customers.", sources)
    assert not lexically_supported("You can't lock your debit card in the mobile app.", sources)
    assert not lexically_supported("You can never lock your debit card in the mobile app.", sources)


def test_an_answer_that_cites_nothing_gets_the_sources_that_support_it_by_wording() -> None:
    from app.rag.grounding import supporting_sources

    answer = "You can lock your debit card instantly in the mobile app under Cards. Outgoing domestic wires cost $25."
    assert supporting_sources(answer, CHUNKS) == [1, 2]
    assert supporting_sources("You can lock your debit card instantly in the mobile app under Cards.", CHUNKS) == [2]
    # Nothing attributed to a claim the sources do not make: a wrong number, an invention, "I don't know".
    assert supporting_sources("Outgoing domestic wire transfers cost $45 each.", CHUNKS) == []
    assert supporting_sources("Every new customer also receives a free cruise to the Bahamas.", CHUNKS) == []
    assert supporting_sources("I don't know. I couldn't find that in our knowledge base.", CHUNKS) == []
