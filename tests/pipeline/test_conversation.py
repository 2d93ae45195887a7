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


def test_the_prompt_keeps_only_the_dialogue() -> None:
    history = [{"role": "user", "content": "I'm Ada"}, {"role": "tool", "content": "x"},
               {"role": "assistant", "content": "Hi Ada!"}]
    messages = conversation_messages("You are the bank's assistant.", history, "what's my name?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("You are the bank's assistant.")
