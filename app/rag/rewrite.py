"""Multi-turn query rewriting: turn a follow-up ("and for Premier?") into a standalone search query.

"join": no LLM call; when the question looks like a follow-up (a pronoun or very short), the recent
user turns are prepended. Cheap and good enough for retrieval, which only needs the topic words.
"llm": one short completion; any error falls back to "join" so retrieval never waits on a broken LLM.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Literal

from app.llm.base import ChatBackend, GenerationOptions

log = logging.getLogger(__name__)

RewriteMode = Literal["join", "llm", "none"]
JOIN_TURNS = 2  # previous user turns joined with a follow-up
SHORT_QUESTION_WORDS = 6
_FOLLOW_UP = re.compile(
    r"\b(it|its|it's|they|them|their|this|that|these|those|he|she|his|her|there|same|one|ones|also|too|"
    r"else|other|another|instead|either|neither|above|mentioned)\b|^(and|but|or|what about|how about|so|then)\b",
    re.IGNORECASE,
)
REWRITE_PROMPT = (
    "Rewrite the user's last question as one standalone search query for a bank's help center, "
    "resolving pronouns from the conversation. Reply with the query only."
)


@dataclass
class Rewrite:
    query: str
    mode: RewriteMode  # what was actually used ("none" when the question stood alone)
    latency_ms: float = 0.0
    error: str | None = None


def looks_like_follow_up(question: str) -> bool:
    return len(question.split()) <= SHORT_QUESTION_WORDS or bool(_FOLLOW_UP.search(question))


def join_rewrite(question: str, history: list[tuple[str, str]]) -> str:
    previous = [user for user, _ in history[-JOIN_TURNS:] if user.strip()]
    if not previous or not looks_like_follow_up(question):
        return question
    return " ".join([*previous, question])


async def rewrite_query(
    question: str,
    history: list[tuple[str, str]],
    mode: Literal["join", "llm"] = "join",
    llm: ChatBackend | None = None,
    *,
    max_tokens: int = 48,
) -> Rewrite:
    """`history` is [(user message, assistant answer), ...], oldest first."""
    started = time.perf_counter()
    if not history:
        return Rewrite(question, "none", 0.0)
    if mode == "llm" and llm is not None and looks_like_follow_up(question):
        try:
            transcript = "\n".join(f"User: {u}\nAssistant: {a[:300]}" for u, a in history[-JOIN_TURNS:])
            messages = [
                {"role": "system", "content": REWRITE_PROMPT},
                {"role": "user", "content": f"{transcript}\nUser: {question}\n\nStandalone query:"},
            ]
            completion = await llm.complete(messages, GenerationOptions(max_tokens=max_tokens, temperature=0.0))
            query = completion.text.strip().strip('"').splitlines()[0].strip() if completion.text.strip() else ""
            if query:
                return Rewrite(query, "llm", (time.perf_counter() - started) * 1e3)
            error = "empty rewrite"
        except Exception as exc:  # any backend failure: the cheap rewrite still gives usable retrieval
            error = f"{type(exc).__name__}: {exc}"
            log.warning("LLM query rewrite failed, falling back to join: %s", error)
        return Rewrite(join_rewrite(question, history), "join", (time.perf_counter() - started) * 1e3, error)
    query = join_rewrite(question, history)
    used: RewriteMode = "join" if query != question else "none"
    return Rewrite(query, used, (time.perf_counter() - started) * 1e3)
