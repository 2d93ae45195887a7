"""The first answer's vet (app/rag/second_look.py `Plan.vet_first`) in SpeculativeGeneration, against a local server
speaking the OpenAI streaming wire: an answer that repeats a word of the question no passage holds ("Yes, you can
mail it to France." when no source says a word about France) is replaced by the "I don't know" text before the
customer sees any of it; other answers stream as they come. Off by default (settings `rag_first_answer_vet`)."""

from __future__ import annotations

import pytest

from app.llm.base import GenerationOptions
from app.llm.client import OpenAICompatClient
from app.pipeline.generation import SpeculativeGeneration
from app.rag.bm25 import Bm25Matrix
from app.rag.chain import DEFAULT_IDK
from app.rag.second_look import Plan
from tests.llm import wire
from tests.rag.conftest import CORPUS

IDF = Bm25Matrix.build(list(CORPUS.values())).idf
MESSAGES = [{"role": "system", "content": "Sources: ..."}, {"role": "user", "content": "q"}]
ABROAD = "and can you mail my replacement card to me in france?"


async def _generate(pieces: list[str], plan: Plan, *, stall_after: int | None = None) -> tuple[list[str], list[dict]]:
    """What the generation queued (as the consumer read it) and the requests the server got."""
    requests: list[dict] = []

    async def handler(request, body):  # type: ignore[no-untyped-def]
        requests.append(body)
        return wire.stream_response(wire.sse(pieces, pings=False), delay_after=stall_after, delay_s=0.5)

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        client = OpenAICompatClient(server.base_url, "m", max_retries=0)
        try:
            generation = SpeculativeGeneration.start(client, MESSAGES, GenerationOptions(), plan)
            return [d async for d in generation.deltas()], requests
        finally:
            await client.aclose()


def _plan(question: str) -> Plan:
    return Plan(DEFAULT_IDK, question, [CORPUS["cards.md"]], idf=IDF, vet_first_answers=True)


async def test_an_answer_about_what_no_passage_says_becomes_the_idk_text() -> None:
    plan = _plan(ABROAD)
    assert plan.vets_first_answer() and plan.unsupported_terms() == {"franc"}  # "mail" is in the passage
    received, requests = await _generate(["Yes, ", "you can mail it ", "to France. ", "It takes ", "5 days."], plan)
    assert "".join(received) == DEFAULT_IDK
    assert len(requests) == 1
    assert plan.record["first_answer_rejected"] == {"echoes": ["france"], "answer": "Yes, you can mail it to France."}


async def test_an_answer_that_keeps_to_the_passages_is_shown_whole() -> None:
    plan = _plan(ABROAD)
    pieces = ["A replacement card ", "arrives within 5 business days ", "by standard mail. ", "Expedited costs $15."]
    received, _ = await _generate(pieces, plan)
    assert "".join(received) == "".join(pieces)
    assert "first_answer_rejected" not in plan.record


@pytest.mark.parametrize("pieces", [["Yes, to France."], ["Yes, to France"]])
async def test_a_one_sentence_answer_is_vetted_too(pieces: list[str]) -> None:
    received, _ = await _generate(pieces, _plan(ABROAD))
    assert "".join(received) == DEFAULT_IDK


async def test_a_question_the_passages_cover_streams_at_once() -> None:
    """Nothing to vet: the first words are released while the rest is still coming (no time to first token lost)."""
    plan = _plan("how much does expedited delivery of a replacement card cost")
    assert not plan.vets_first_answer()
    pieces = ["Expedited ", "delivery costs ", "$15."]
    received, _ = await _generate(pieces, plan, stall_after=1)  # the server stalls after the first piece
    assert len(received) >= 2 and received[0] == "Expedited "
    assert "".join(received) == "".join(pieces)


async def test_an_answer_in_the_customers_words_that_states_a_source_figure_is_shown() -> None:
    question = "can i get my replacement card here fast"  # "fast": the source says "expedited"
    assert _plan(question).unsupported_terms() == {"fast"}
    for pieces in (["Sending it ", "fast costs $15."], ["The fast ", "option costs $15."]):
        received, _ = await _generate(pieces, _plan(question))
        assert "".join(received) == "".join(pieces)
    invented = _plan(question)  # a figure no passage holds is no excuse
    received, _ = await _generate(["The fast ", "option costs $99."], invented)
    assert "".join(received) == DEFAULT_IDK
    assert invented.record["first_answer_rejected"]["echoes"] == ["fast"]


async def test_the_customers_own_action_restated_is_no_invented_subject() -> None:
    """"miss" is as rare in the knowledge base as "France", but the answer restates what the customer does with it;
    only a word the answer names as a thing (after an article, a possessive or a preposition) counts."""
    passage = "Wires submitted after the cut-off are sent on the next business day."
    plan = Plan(DEFAULT_IDK, "if i miss the cutoff for a wire when does it go out", [passage], idf=IDF,
                vet_first_answers=True)
    assert {"miss", "go"} <= plan.unsupported_terms()  # rare in the tiny test corpus
    assert plan.vet_first("If you miss the cutoff, it goes out the next business day.")
    assert not plan.vet_first("A miss of the cutoff is free.")


def test_a_hyphenated_source_word_is_the_same_word_unhyphenated() -> None:
    passage = "Wires submitted after the cut-off are sent on the next business day."
    assert Plan(DEFAULT_IDK, "whats the cutoff for wires", [passage], idf=IDF).unsupported_terms() == frozenset()
