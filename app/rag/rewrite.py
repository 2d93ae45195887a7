"""Multi-turn query rewriting: turn a follow-up ("and for Premier?") into a standalone search query.

"join": no LLM call; when the question may be a follow-up, the recent user turns (its subject) are prepended.
Cheap and good enough for retrieval, which only needs the topic words. A follow-up that points back explicitly
(a pronoun, "and for X?", "what about...") always carries the subject. A short question that does not
("how long for the replacement to show up", but also "what's the wire cutoff time?" after a card question) is
`implicit`: the retrieval stage keeps whichever of the joined query and the question alone matches the knowledge
base better (`settle`), so a new topic is not searched under the old one.
"llm": one short completion; any error falls back to "join" so retrieval never waits on a broken LLM.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.llm.base import ChatBackend, GenerationOptions

log = logging.getLogger(__name__)

RewriteMode = Literal["join", "llm", "none"]
JOIN_TURNS = 2  # previous user turns joined with a follow-up
# Up to this many words, a question without an explicit back-reference may still lean on the earlier turns
# ("can i use a po box for the address" after "what do I need to open an account"): customers write short.
SHORT_QUESTION_WORDS = 10
# `settle`: an implicit follow-up is searched alone when the chunk it finds alone is this much closer (cosine) to
# it than the one the joined query finds. Measured on tests/data/rag_followups.jsonl: elliptic follow-ups
# 0.00-0.21, new topics 0.28-0.63 (bench/followup_retrieval.py).
SUBJECT_SWITCH_MARGIN = 0.25
_FOLLOW_UP = re.compile(
    r"\b(it|its|it's|they|them|their|this|that|these|those|he|she|his|her|there|same|one|ones|also|too|"
    r"else|other|another|instead|either|neither|above|mentioned)\b"
    # "and for premier?", "ok and what if it was stolen", "so i cant get it back??"
    r"|^\W*(?:(?:ok(?:ay)?|oh|right|cool|great|thanks?)\W+)?(and|but|or|what about|how about|what if|so|then)\b",
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
    # The question was joined without pointing back explicitly: retrieval may keep it alone (`settle`).
    implicit: bool = False


# A short question ending on a particle or preposition with nothing after it left its object to the conversation
# ("what happens if i go over" — the withdrawal limit; "how long for the replacement to show up"): searched alone,
# "go over" found the overdraft page instead of the savings limit it continued.
_DANGLING = re.compile(r"\b(?:over|out|back|through|about|for|with|to|from|up|off|on|in)\W*$", re.IGNORECASE)


def refers_back(question: str) -> bool:
    """An explicit back-reference: a pronoun, a connector opening ("and for...", "what about..."), or a short
    question whose last word is a particle or preposition without its object."""
    if _FOLLOW_UP.search(question):
        return True
    return len(question.split()) <= SHORT_QUESTION_WORDS and bool(_DANGLING.search(question))


def looks_like_follow_up(question: str) -> bool:
    """May lean on earlier turns (False: the question is its own retrieval query whatever the history)."""
    return len(question.split()) <= SHORT_QUESTION_WORDS or refers_back(question)


def join_rewrite(question: str, history: list[tuple[str, str]]) -> str:
    previous = [user for user, _ in history[-JOIN_TURNS:] if user.strip()]
    if not previous or not looks_like_follow_up(question):
        return question
    return " ".join([*previous, question])


def settle(
    question: str,
    rewrite: Rewrite,
    question_vec: np.ndarray,
    query_vec: np.ndarray,
    nearest: Callable[[np.ndarray], np.ndarray | None],
) -> tuple[str, float | None]:
    """The query to search and the subject-switch gap it was chosen on (None: not `implicit`, nothing to choose).

    `nearest(vec)` is the stored embedding of the knowledge-base chunk nearest `vec` (a dense top-1). The gap is
    how much closer to the question the chunk it finds alone is than the chunk the joined query finds: a carried
    subject that pulls the search to the old topic makes it large ("what's the wire cutoff time?" after a card
    question: 0.54), an elliptic follow-up keeps it small ("whats the most i can send a day" after a Larkspur Send
    question: 0.15) because the question alone finds nothing better than the subject's own chunk."""
    if not rewrite.implicit or rewrite.query == question:
        return rewrite.query, None
    alone, joined = nearest(question_vec), nearest(query_vec)
    if alone is None or joined is None:
        return rewrite.query, None
    q = np.asarray(question_vec, dtype=np.float32)
    gap = float(np.dot(alone, q) - np.dot(joined, q))
    return (question if gap >= SUBJECT_SWITCH_MARGIN else rewrite.query), gap


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
    implicit = used == "join" and not refers_back(question)
    return Rewrite(query, used, (time.perf_counter() - started) * 1e3, implicit=implicit)
