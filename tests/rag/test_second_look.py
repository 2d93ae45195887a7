"""The second look's pure parts (app/rag/second_look.py): recognising the "I don't know" text as it streams, the
coverage gate on the passages the prompt really holds (real BM25 statistics, the real prompt chain), and the
follow-up it asks."""

from __future__ import annotations

import pytest

from app.rag.base import Chunk
from app.rag.bm25 import Bm25Matrix, tokenize
from app.rag.chain import DEFAULT_IDK, build_messages, prompt_passages
from app.rag.passages import question_coverage
from app.rag.second_look import Plan, enabled, idk_key, idk_state, make_plan, question_words
from app.settings import Settings
from tests.rag.conftest import CORPUS

CHUNKS = [
    Chunk(id=f"{name}#0", document_id=name, source=name, title=name.split(".")[0].title(), content=text, score=0.6)
    for name, text in CORPUS.items()
]
IDF = Bm25Matrix.build([c.content for c in CHUNKS]).idf
KEY = idk_key(DEFAULT_IDK)


def _prompt(question: str, fit: str = "passages") -> tuple[list[dict[str, str]], list[Chunk]]:
    prepared = build_messages(
        question, [], CHUNKS, system_prompt="You are a bank assistant.", context_tokens=400, idk_text=DEFAULT_IDK,
        fit=fit, idf=IDF,  # type: ignore[arg-type]
    )  # fmt: skip
    return prepared.messages, prepared.sources


def test_the_idk_text_is_recognised_from_its_first_sentence_as_it_streams() -> None:
    assert KEY == "i don't know"
    for partial in ("", " ", "I", "I don", '"I don’t'):
        assert idk_state(partial, KEY) == "maybe"
    for whole in (DEFAULT_IDK, "I don’t know.", '"I don\'t know." ', "i DON'T know the fee, but [1] says $5."):
        assert idk_state(whole, KEY) == "idk"
    for other in ("It", "I can help", "Yes, you can lock it [1].", "The fee is $5. I don't know more."):
        assert idk_state(other, KEY) == "no"


def test_the_idk_request_stops_at_its_second_sentence_and_is_then_shown_whole() -> None:
    plan = Plan(DEFAULT_IDK, "q", ["p"])
    assert plan.stop() == "I couldn't find that in our knowledge"
    assert plan.within_idk("I don't know. ") and plan.within_idk("i don’t know. I couldn't")
    assert not plan.within_idk("I don't know the fee, but [1] says $5.")
    long = "I don't know. I couldn't find that in Larkspur Bank's help articles. Call 1-800-555-0142."
    assert Plan(long, "q", ["p"]).stop() == "I couldn't find that in Larkspur Bank's"
    assert Plan("I don't know.", "q", ["p"]).stop() is None


def test_prompt_passages_are_what_each_numbered_source_shows() -> None:
    for fit in ("passages", "chunks"):
        messages, sources = _prompt("How much does an outgoing international wire cost?", fit)
        texts = prompt_passages(messages[0]["content"], sources)
        assert len(texts) == len(sources) > 0
        for text, chunk in zip(texts, sources, strict=True):
            assert text and f"{text}" in messages[0]["content"]
            assert not text.startswith("[")  # the heading is not part of it
            assert text.split()[0] in chunk.content
    assert prompt_passages("Sources: none.", []) == []


def test_coverage_leaves_chat_fillers_out() -> None:
    text = CORPUS["wires.md"]
    plain = question_coverage(text, "what does an international wire cost", idf=IDF)
    chatty = question_coverage(text, "hey whats an international wire cost rn pls", idf=IDF)
    assert plain.terms == chatty.terms == frozenset(tokenize("international wire cost"))
    assert chatty.share == pytest.approx(plain.share)
    assert question_coverage(text, "can I buy stocks in the app", idf=IDF).share == 0.0


def test_a_follow_up_is_covered_by_its_own_words_unless_it_has_none() -> None:
    wires = CORPUS["wires.md"]
    previous = "how much is an outgoing international wire"
    assert question_coverage(wires, "and can you send it to france", previous=previous, idf=IDF).share == 0.0
    assert question_coverage(wires, "and that one?", previous=previous, idf=IDF).share == 1.0


def test_the_gate_opens_only_when_one_passage_covers_the_question() -> None:
    question = "how much does an international wire cost"
    messages, sources = _prompt(question)
    plan = make_plan(Settings(), idk=DEFAULT_IDK, question=question, history=[], messages=messages,
                     sources=sources, idf=IDF)  # fmt: skip
    assert plan is not None
    assert plan.worth_it()
    n, cover = plan.best()
    assert "$45" in plan.passages[n - 1] and cover.share >= plan.min_coverage
    assert plan.record == {"source": n, "coverage": round(cover.share, 3)}
    follow_up = plan.follow_up()
    assert follow_up.startswith(f'Source [{n}] does talk about "international", "wire" and "cost".')
    assert "know" not in follow_up  # offered the "I don't know" text again, the small model copies it

    off_topic = "can I buy stocks and crypto in the larkspur app"
    messages, sources = _prompt(off_topic)
    plan = make_plan(Settings(), idk=DEFAULT_IDK, question=off_topic, history=[], messages=messages,
                     sources=sources, idf=IDF)  # fmt: skip
    assert plan is not None and not plan.worth_it()
    assert plan.record["skipped"].startswith("coverage 0.")


def test_the_second_request_keeps_the_first_messages_and_records_what_happened() -> None:
    question = "how many free savings withdrawals do I get"
    messages, sources = _prompt(question)
    plan = Plan(DEFAULT_IDK, question, prompt_passages(messages[0]["content"], sources), idf=IDF)
    assert plan.worth_it()
    again = plan.messages(messages, "I don't know. ")
    assert again[: len(messages)] == messages
    assert again[len(messages)] == {"role": "assistant", "content": "I don't know."}
    assert again[-1]["role"] == "user" and again[-1]["content"] == plan.follow_up()
    assert plan.lead() == "" and plan.record["follow_up"] == plan.follow_up()
    assert plan.vet("You get six free withdrawals each statement cycle [1].")
    assert plan.record["ran"] and plan.record["outcome"] == "answered"
    assert not plan.vet(DEFAULT_IDK)
    assert plan.record["outcome"] == "idk"


def test_a_prefilled_second_look_starts_the_answer_from_the_source() -> None:
    question = "how many free savings withdrawals do I get"
    messages, sources = _prompt(question)
    plan = Plan(DEFAULT_IDK, question, prompt_passages(messages[0]["content"], sources), idf=IDF, prefill=True)
    n, _ = plan.best()
    assert plan.lead() == f"According to source [{n}],"
    assert plan.messages(messages, "I don't know. ") == [*messages, {"role": "assistant", "content": plan.lead()}]
    assert plan.record["lead"] == plan.lead() and "follow_up" not in plan.record
    assert plan.vet(plan.lead() + " you get six free withdrawals each statement cycle.")
    assert plan.record["outcome"] == "answered"
    assert not plan.vet(plan.lead() + " I don't know.")
    assert plan.record["outcome"] == "idk"
    auto = make_plan(Settings(), idk=DEFAULT_IDK, question=question, history=[], messages=messages, sources=sources,
                     idf=IDF, prefill_ok=True)  # fmt: skip
    assert auto is not None and auto.prefill


def test_an_answer_about_what_no_source_says_is_rejected() -> None:
    """The second look answers; its first sentence must not put the question's rare words that no passage holds into
    the source's mouth (the 1.5B model gave "the WiFi password at the Larkspur Plaza branch is 135550123")."""
    question = "what is the wifi password for the larkspur mobile app"
    plan = Plan(DEFAULT_IDK, question, [CORPUS["app-errors.txt"]], idf=IDF, prefill=True)
    assert not plan.vet(plan.lead() + " the wifi password for the mobile app is QX-7731.")
    assert plan.record["outcome"] == "rejected" and plan.record["echoes"] == ["wifi", "password"]
    assert plan.vet(plan.lead() + " if the app shows a sign-in error, check your internet connection.")
    assert plan.record["outcome"] == "answered"


def test_an_answer_that_restates_the_idk_text_is_the_idk() -> None:
    """The prefilled second look sometimes goes on with the "I don't know" text's contact line: no answer."""
    idk = ("I don't know. I couldn't find that in Larkspur Bank's help articles. You can reach Larkspur Bank support "
           "at 1-800-555-0142 or visit any branch.")  # rails/texts.co  # fmt: skip
    question = "someone stole my identity and my debit card was used for $900 i didnt make"
    messages, sources = _prompt(question)
    plan = Plan(idk, question, prompt_passages(messages[0]["content"], sources), idf=IDF, prefill=True)
    assert not plan.vet(f"{plan.lead()} you can reach Larkspur Bank support at 1-800-555-0142 or visit any branch "
                        "to report the theft.")  # fmt: skip
    assert plan.record["outcome"] == "idk"
    assert not plan.vet(f"{plan.lead()} I couldn't find that in the help articles.")
    assert plan.vet(f"{plan.lead()} lock the card in the app and call the fraud team at 1-800-555-0199 any time.")
    assert plan.record["outcome"] == "answered"


def test_a_follow_up_names_the_subject_of_the_previous_question() -> None:
    history = [
        {"role": "user", "content": "how much is an international wire"},
        {"role": "assistant", "content": "$45"},
    ]
    question = "and how long does it take"
    messages, sources = _prompt(question)
    plan = make_plan(Settings(), idk=DEFAULT_IDK, question=question, history=history, messages=messages,
                     sources=sources, idf=IDF)  # fmt: skip
    assert plan is not None and plan.previous == "how much is an international wire"
    assert question_words("Send the WIRE today!", frozenset({"wire", "today"})) == ["WIRE", "today"]


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    messages, sources = _prompt("how much is an international wire")
    monkeypatch.setenv("GUARDCHAT_RAG_SECOND_LOOK", "false")
    assert not enabled(Settings())
    assert make_plan(Settings(), idk=DEFAULT_IDK, question="q", history=[], messages=messages, sources=sources,
                     idf=IDF) is None  # fmt: skip
    monkeypatch.setenv("GUARDCHAT_RAG_SECOND_LOOK", "1")
    assert enabled(Settings())
    monkeypatch.setenv("GUARDCHAT_RAG_SECOND_LOOK_MODE", "follow_up")
    plan = make_plan(Settings(), idk=DEFAULT_IDK, question="q", history=[], messages=messages, sources=sources,
                     idf=IDF, prefill_ok=True)  # fmt: skip
    assert plan is not None and not plan.prefill
    assert make_plan(Settings(), idk=DEFAULT_IDK, question="q", history=[], messages=messages, sources=[],
                     idf=IDF) is None  # fmt: skip
    abroad = "can you mail my wire confirmation to france"  # "france": no passage holds it
    monkeypatch.setenv("GUARDCHAT_RAG_FIRST_ANSWER_VET", "true")
    plan = make_plan(Settings(), idk=DEFAULT_IDK, question=abroad, history=[], messages=messages, sources=sources,
                     idf=IDF)  # fmt: skip
    assert plan is not None and plan.vets_first_answer()
    monkeypatch.setenv("GUARDCHAT_RAG_FIRST_ANSWER_VET", "false")
    plan = make_plan(Settings(), idk=DEFAULT_IDK, question=abroad, history=[], messages=messages, sources=sources,
                     idf=IDF)  # fmt: skip
    assert plan is not None and not plan.vets_first_answer() and plan.vet_first("Yes, we mail it to France.")


def test_a_story_told_before_the_question_neither_closes_the_gate_nor_counts_as_an_echo() -> None:
    """'my wallet got stolen in a mugging, what's my liability...': the story's words ("mugging", no chunk holds it)
    outweighed the question in the gate, and "ex" in "my ex has my card" was an echo that rejected a good answer."""
    story = "my wallet got snatched by a mugger outside the opera in lisbon, how much does a replacement card cost"
    plan = Plan(DEFAULT_IDK, story, [CORPUS["cards.md"]], idf=IDF, prefill=True)
    assert plan.ask == "how much does a replacement card cost"
    whole = question_coverage(CORPUS["cards.md"], story, idf=IDF).share
    assert whole < plan.min_coverage <= plan.best()[1].share and plan.worth_it()
    assert plan.vet(plan.lead() + " if your wallet got snatched in Lisbon, expedited delivery costs $15.")
    assert plan.record["outcome"] == "answered"

    asked = "what is the wifi password, my taxi driver in lisbon needs it"  # the ask holds the rare word: an echo
    plan = Plan(DEFAULT_IDK, asked, [CORPUS["app-errors.txt"]], idf=IDF, prefill=True)
    assert plan.ask == "what is the wifi password"
    assert not plan.vet(plan.lead() + " the wifi password is QX-7731.")
    assert plan.record["echoes"] == ["wifi", "password"]


def test_an_amount_the_customer_gave_is_no_echo() -> None:
    question = "someone used my debit card for $900 i didnt make"
    plan = Plan(DEFAULT_IDK, question, [CORPUS["cards.md"]], idf=IDF, prefill=True)
    assert plan.vet(plan.lead() + " if $900 went on your debit card, lock your debit card in the app.")
    assert plan.record["outcome"] == "answered"
