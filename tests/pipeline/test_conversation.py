"""Which questions are about the conversation itself (answered from the history, not the knowledge base)."""

from __future__ import annotations

import pytest

from app.pipeline.conversation import about_conversation, conversation_messages


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
