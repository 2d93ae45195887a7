"""The topic rail on follow-ups: a message the rail refuses alone is judged again in its conversation.

A follow-up that leans on the conversation ("how long does it take you guys to finish" after a dispute question,
"how far back can i go" after one about statements) reads off-topic alone: the guard model's topic head sees no bank
subject in it. When the topic rail refuses a message as generically off-topic (the detector's `off_topic` label and
no blocked `define user` example), the message is judged again on the query the retrieval rewriter builds for it
(app/rag/rewrite.py `join_rewrite`: the last user turns + the message; no LLM, whatever GUARDCHAT_QUERY_REWRITE is,
so the same conversation always gets the same verdict). It is allowed only when
1. the rewriter keeps an earlier subject: there is an earlier user turn and the message is short or refers back;
2. the joined text passes the same rail (the guard model below `off_topic_block`, no blocked example);
3. the message brings no subject of its own, by two measures that must both agree:
   - the topic head: the joined text's off-topic odds are at most 10x those of the earlier turns alone
     (FOLLOW_UP_MAX_RISE). The guard model reads a joined text as on-domain whenever the earlier turns are,
     whatever was appended (a lost-card question + "btw what's the weather going to be like tomorrow": off_topic
     0.00), so "is the joined text on-domain" alone would let topic switches through; a new subject still
     multiplies the odds (by 15 or more for every dev and heldout switch, by 0.4 to 8.6 for the follow-ups);
   - the embeddings: the joined text stays closer to the earlier turns than to the message (FOLLOW_UP_MIN_GAP).
Advice (investment, legal, tax labels) and blocked examples are never lifted by context, and the safety and attack
rails always judge the message alone: only this rail reads the conversation. The rail's detail ("why?") names the
context used. Measured on tests/data/topic_followups.jsonl by bench/topic_followups.py (docs/rails.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from app.guard.base import RailResult
from app.guard.cascade import SafetyCascade, timed_score
from app.observability import model_time
from app.rag.base import Embedder
from app.rag.rewrite import join_rewrite

if TYPE_CHECKING:
    from app.guard.base import Classifier, DetectorScores

FOLLOW_UP_MAX_RISE = 1.0  # log10: the joined text's off-topic odds at most 10x those of the earlier turns alone
FOLLOW_UP_MIN_GAP = 0.25  # the joined text's cosine to the earlier turns at least this above its cosine to the message
# Off-topic probabilities below this count as this: between two texts the topic head is sure are on-domain (0.0001
# vs 0.003), the ratio of their odds is noise that moves with every retrain, not a new subject.
FOLLOW_UP_ODDS_FLOOR = 0.01


@dataclass(frozen=True)
class FollowUp:
    """A message in its conversation: the rewriter's joined query (`text`) and the earlier user turns it carries,
    with their guard-model scores and embeddings, and the message's embedding (all from one embedder)."""

    text: str
    earlier: str
    scores: DetectorScores
    earlier_scores: DetectorScores
    embedding: np.ndarray
    earlier_embedding: np.ndarray
    message_embedding: np.ndarray

    def rise(self) -> float:
        """How many orders of magnitude the message adds to the earlier turns' off-topic odds."""
        floor = FOLLOW_UP_ODDS_FLOOR
        return log_odds(max(self.scores.off_topic, floor)) - log_odds(max(self.earlier_scores.off_topic, floor))

    def subject_gap(self) -> float:
        """How much closer (cosine) the joined text stays to the earlier turns than to the message."""
        return float(np.dot(self.embedding, self.earlier_embedding) - np.dot(self.embedding, self.message_embedding))


def log_odds(p: float) -> float:
    p = min(max(p, 1e-9), 1.0 - 1e-9)
    return float(np.log10(p / (1.0 - p)))


def follow_up_texts(messages: Sequence[dict[str, str]]) -> tuple[str, str, str] | None:
    """(the message, the rewriter's joined query, the earlier user turns it carries), or None when the rewriter
    keeps no earlier subject: no earlier user turn, or a message long enough to stand alone without referring back."""
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    if len(users) < 2:
        return None
    message = users[-1]
    joined = join_rewrite(message, [(user, "") for user in users[:-1]])
    if joined == message:
        return None
    return message, joined, joined[: len(joined) - len(message)].strip()


def may_follow_up(cascade: SafetyCascade, embedding: np.ndarray, scores: DetectorScores | None) -> bool:
    """A refusal the conversation may lift: the detector's generic off-topic, not an advice label and not a blocked
    example (those name their own refused subject, and context never makes advice acceptable)."""
    if scores is None or cascade.detector is None or scores.topic != "off_topic":
        return False
    return cascade.topic_matcher.match(embedding).intent is None


def read_follow_up(classifier: Classifier, embedder: Embedder, message: str, joined: str, earlier: str) -> FollowUp:
    """Scores and embeds the joined query and the earlier turns (blocking: run it in a thread). In the server the
    turn has already run the guard model on the message and on the joined query (its one batched embedding), so
    those come from the guard model's cache."""
    message_vec, joined_vec, earlier_vec = _embed(classifier, embedder, [message, joined, earlier])
    return FollowUp(
        text=joined,
        earlier=earlier,
        scores=timed_score(classifier, joined, embedder, joined_vec),
        earlier_scores=timed_score(classifier, earlier, embedder, earlier_vec),
        embedding=joined_vec,
        earlier_embedding=earlier_vec,
        message_embedding=message_vec,
    )


def _embed(classifier: Classifier, embedder: Embedder, texts: list[str]) -> list[np.ndarray]:
    """Each text alone, so that its vector never depends on what else the server embeds at the time: from the guard
    model's shared pass where it gives one, else from the embedder under the server's batching (`inner`)."""
    shared = getattr(classifier, "embedding", None)
    alone: Embedder = getattr(embedder, "inner", embedder)
    with model_time.span():
        vectors = [shared(text) if shared is not None else None for text in texts]
        vectors = [alone.embed([text])[0] if vec is None else vec for text, vec in zip(texts, vectors, strict=True)]
    return [np.asarray(vec, dtype=np.float32).reshape(-1) for vec in vectors]


def _quoted(text: str, limit: int = 80) -> str:
    return f'"{text}"' if len(text) <= limit else f'"...{text[-limit:]}"'


def judge_in_context(
    cascade: SafetyCascade, alone: RailResult, intent: str | None, follow_up: FollowUp
) -> tuple[RailResult, str | None]:
    """The verdict on a message refused alone (`alone`, `intent`), judged in its conversation: allowed when the
    joined text passes the rail and the message brings no subject of its own, else the refusal stands. The detail
    names the context used and the measures."""
    joined, _ = cascade.topic(follow_up.embedding, follow_up.scores)
    rise, gap = follow_up.rise(), follow_up.subject_gap()
    why = [] if joined.verdict == "allow" else ["the joined query is refused too"]
    if rise > FOLLOW_UP_MAX_RISE:
        why.append(f"it multiplies the off-topic odds by {10**rise:.3g} (max {10**FOLLOW_UP_MAX_RISE:g})")
    if gap < FOLLOW_UP_MIN_GAP:
        why.append(f"subject gap {gap:+.2f} < {FOLLOW_UP_MIN_GAP:g}")
    detail = (
        f"{alone.detail}; in context (the rewriter's query: earlier turns {_quoted(follow_up.earlier)} + this "
        f"message): {joined.detail}; off-topic odds x{10**rise:.3g} the earlier turns', subject gap {gap:+.2f} -> "
        + ("still refused: " + "; ".join(why) if why else "allowed as a follow-up")
    )
    if why:
        return RailResult("topic", alone.verdict, list(alone.categories), alone.score, alone.latency_ms, detail), intent
    return RailResult("topic", "allow", [], joined.score, alone.latency_ms, detail), None


async def topic_in_context(
    cascade: SafetyCascade,
    embedder: Embedder | None,
    messages: Sequence[dict[str, str]],
    embedding: np.ndarray,
    scores: DetectorScores | None,
    alone: RailResult,
    intent: str | None,
) -> tuple[RailResult, str | None]:
    """The topic rail's verdict on a message it refused alone: unchanged unless it may be a follow-up (above)."""
    if embedder is None or cascade.detector is None or not may_follow_up(cascade, embedding, scores):
        return alone, intent
    texts = follow_up_texts(messages)
    if texts is None:
        return alone, intent
    started = time.perf_counter()
    try:
        follow_up = await asyncio.to_thread(read_follow_up, cascade.detector, embedder, *texts)
    except Exception as exc:  # the refusal stands (fail closed); the detail says the context could not be read
        alone.detail = f"{alone.detail}; in context: not scored ({type(exc).__name__}: {exc})"
        return alone, intent
    result, intent = judge_in_context(cascade, alone, intent, follow_up)
    result.latency_ms = alone.latency_ms + (time.perf_counter() - started) * 1000.0
    return result, intent
