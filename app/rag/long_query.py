"""What a long message asks: its question sentences, apart from the situation told around them.

Customers often write a paragraph: who they are, what happened, how they feel, and somewhere in it (not always
last) the question. Searched whole, every word weighs the same, so BM25 matches the story ("wedding", "car",
"Japan") as readily as the question, and in a large knowledge base chunks about the story's details crowd the
keyword list. `split_message` separates the asking sentences from the rest so the keyword search can weigh them
(app/rag/retrieve.py); the dense search keeps the whole message, whose embedding already centres on its topic.

An asking sentence ends with "?", or opens with a question word or an inverted auxiliary ("how do I...",
"can you...", "is there..."), or asks indirectly ("I'd like to know...", "please tell me..."). A message with
no asking sentence, or with nothing but asking sentences, is searched as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends at . ! ? (runs of them, closing quotes/brackets) followed by whitespace, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
_QUESTION_OPENING = re.compile(
    r"^\W*(?:(?:so|and|but|ok(?:ay)?|also|anyway|basically|honestly|quick question|my question is)\W+)*"
    r"(?:how|what|what's|whats|when|where|why|which|who|whom|whose|"
    r"can|could|do|does|did|is|are|was|were|will|would|should|shall|may|might|am|have|has|"
    r"isn't|aren't|don't|doesn't|didn't|can't|won't|wouldn't|shouldn't|any)\b",
    re.IGNORECASE,
)
_INDIRECT_ASK = re.compile(
    r"\b(?:i(?:'d| would) like to know|i want to know|i need to know|wondering|wonder (?:if|whether|how|what|why)|"
    r"please (?:tell|explain|let me know|advise|help)|tell me (?:how|what|when|where|why|if|whether)|"
    r"let me know (?:how|what|when|where|why|if|whether)|explain (?:how|what|why))\b",
    re.IGNORECASE,
)
# Fewer sentences than this: a question with at most one line of context; searched as it is.
MIN_SENTENCES = 3
# Inside a sentence, a clause ends at a comma, semicolon or dash: "my wallet got stolen in a mugging, what's my
# liability for the charges" tells its story in one clause and asks in the next.
_CLAUSE_END = re.compile(r"\s*[,;]\s+|\s+[-\u2013\u2014]+\s+")


@dataclass(frozen=True)
class MessageParts:
    asking: str  # the question sentences, in order ("" when none was found)
    context: str  # everything else

    @property
    def split(self) -> bool:
        """True when the message has both a question and a situation around it."""
        return bool(self.asking and self.context)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s and s.strip()]


def is_asking(sentence: str) -> bool:
    s = sentence.strip()
    return s.endswith("?") or bool(_QUESTION_OPENING.match(s)) or bool(_INDIRECT_ASK.search(s))


def asking_clauses(text: str) -> str:
    """The clauses of a short message that ask, when others only tell the story ("my ex has my card and keeps using
    it, how do i kill it" -> "how do i kill it"); "" when every clause asks or none does."""
    clauses = [c.strip() for s in sentences(text) for c in _CLAUSE_END.split(s) if c and c.strip()]
    asking = [c for c in clauses if is_asking(c)]
    if not asking or len(asking) == len(clauses):
        return ""
    return " ".join(asking)


def split_message(text: str, *, min_sentences: int = MIN_SENTENCES) -> MessageParts:
    """The asking sentences and the rest; a message under `min_sentences` sentences is all `asking`."""
    parts = sentences(text)
    if len(parts) < min_sentences:
        return MessageParts(text.strip(), "")
    asking = [s for s in parts if is_asking(s)]
    if not asking or len(asking) == len(parts):
        return MessageParts(text.strip(), "")
    context = [s for s in parts if not is_asking(s)]
    return MessageParts(" ".join(asking), " ".join(context))
