"""Which questions are about the conversation itself (answered from the history, not the knowledge base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.pipeline.conversation import about_conversation, asks_name, conversation_messages, names_someone_else


@pytest.mark.parametrize("text", [
    "and what's my name again?", "Sorry, what did you just say?", "could you explain that more simply",
    "can u repeat the last step", "summarise our conversation please", "ok put it in one sentence",
    "you told me $45 before, right?", "What was my previous question?", "whats my name",
])
def test_questions_about_the_conversation(text: str) -> None:
    assert about_conversation(text)


@pytest.mark.parametrize("text", [
    "How do I change the name on my account?", "Is there a simpler checking account?", "What's the wire fee?",
    "how long does it take to arrive?", "my name is misspelled on my card", "Can I dispute a charge I don't recognise?",
])
def test_bank_questions_are_not(text: str) -> None:
    assert not about_conversation(text)


INTENT_SET = Path(__file__).resolve().parents[1] / "data" / "conversation_intent.jsonl"


def test_an_independent_set_of_customer_messages_is_told_apart() -> None:
    """tests/data/conversation_intent.jsonl was written by an author who saw neither the patterns nor their tests:
    150 messages about the conversation (ten kinds: repeat, rephrase, simplify, shorten, summarise, clarify, recall
    what either side said, reformat, reactions) and 150 bank messages that borrow their words. Measured when the
    patterns were widened (session 14): 35% -> 63% recognised, 0.7% of the bank messages taken (one, before and
    after: "whats the first step to open a business account")."""
    rows = [json.loads(line) for line in INTENT_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    about = [about_conversation(r["text"]) for r in rows if r["about_conversation"]]
    bank = [about_conversation(r["text"]) for r in rows if not r["about_conversation"]]
    assert len(about) == len(bank) == 150
    assert sum(about) / len(about) >= 0.6
    assert sum(bank) / len(bank) <= 0.01


@pytest.mark.parametrize("text", [
    "the cash machine gave me $40 less than I asked for", "i said not me to the fraud text, whats next",
    "I have $20k in savings, can I put it into a CD instead?", "they say they didn't get it, the bill pay",
    "I got a letter saying my account is garnished, what does that mean?", "what is that fee on my statement",
    "who am I paying for the overdraft on my statement", "who am i supposed to call about a stolen card",
])
def test_the_customers_own_story_is_not_about_the_conversation(text: str) -> None:
    assert not about_conversation(text)


@pytest.mark.parametrize("text", ["huh?", "one more time please", "explain like im five", "tl;dr",
                                  "what does that mean?", "i didnt understand your last answer"])
def test_bare_requests_for_the_last_answer(text: str) -> None:
    assert about_conversation(text)


def test_the_prompt_shows_the_dialogue_as_a_transcript() -> None:
    history = [{"role": "user", "content": "I'm Ada"}, {"role": "tool", "content": "x"},
               {"role": "assistant", "content": "Hi Ada!"}, {"role": "user", "content": "What's the wire fee?"},
               {"role": "assistant", "content": "It is $45 [1]. " + "More detail. " * 80}]
    messages = conversation_messages("You are the bank's assistant.", history, "what was my last question?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("You are the bank's assistant.")
    shown = messages[1]["content"]
    assert "Customer (message 1): I'm Ada" in shown and "Customer (message 2): What's the wire fee?" in shown
    assert "x" not in shown.split("\n")  # only user and assistant turns
    assert "Assistant: It is $45 [1]." in shown and shown.count("More detail.") < 80  # long answers cut
    assert shown.endswith("what was my last question?")


@pytest.mark.parametrize(
    ("answer", "first_message", "made_up"),
    [
        ("Your name is Larkspur Bank.", "how do I order checks?", True),
        ("You are Deshawn.", "Good morning, I'm Deshawn. How do I close savings?", False),
        ("Yes, your name is Kwame.", "my name is kwame and I lost my card", False),
        ("You're right, your name is Priya.", "Hi, this is Priya. Fee for a cashier's check?", False),
        ("You said your name was \u201cMarta\u201d.", "Hey! Marta here.", False),
        ("You are Sam.", "Hey! Marta here.", True),
        ("Your name is [Customer's name].", "how do I order checks?", True),  # the 1.5B model's placeholder
        ("You haven't told me your name yet.", "how do I order checks?", False),  # names nobody
        ("Yes, I remember your name.", "Hey! Marta here.", False),  # unverifiable, not a made-up name
    ],
)
def test_a_stated_name_must_be_one_the_customer_wrote(answer: str, first_message: str, made_up: bool) -> None:
    history = [{"role": "user", "content": first_message}, {"role": "assistant", "content": "Sure, Sam can help."}]
    assert names_someone_else(answer, history) is made_up  # the assistant's own words do not count


@pytest.mark.parametrize("text", ["what's my name?", "do you remember my name", "Who am I again?", "whats my name"])
def test_questions_about_the_customers_name(text: str) -> None:
    assert asks_name(text) and about_conversation(text)


@pytest.mark.parametrize("text", ["what name is on my account?", "can I change my name on my card", "who am I paying"])
def test_bank_questions_with_a_name_are_not(text: str) -> None:
    assert not asks_name(text)
