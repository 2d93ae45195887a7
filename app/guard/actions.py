"""Our NeMo Guardrails actions. The Colang flows in rails/*.co call them and utter the refusal.

NeMo runs the flows (in parallel for input rails); the per-turn data (messages, the turn's
embedding, detector scores, the answer window) and the per-rail results travel in a context
variable, which every task NeMo spawns inherits. Each action records a RailResult there and returns
a short string the flow branches on:
  safety / output safety: "allow" | "block" | "error"
  attack:                 "allow" | "block"
  topic:                  "allow" | "error" | <the blocked `define user` intent>
                          (a message refused alone is judged again in its conversation when it may be a
                          follow-up: app/guard/topic_followup.py; every other rail judges the message alone)
  groundedness:           "allow" | "block" | "skip" | "error"
With `guard_fail_open` (development only) an "error" is returned as "allow"; the RailResult keeps
verdict "error" so the trace still shows it.

We do not use NeMo's library Llama Guard action: it splits `unsafe\\nS1,S2` wrongly and has no way
to see our hold-back window when streaming.
"""

from __future__ import annotations

import contextvars
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from app.guard.base import RailResult
from app.guard.cascade import SafetyCascade
from app.guard.llama_guard import conversation_from_messages
from app.guard.topic_followup import topic_in_context
from app.rag.base import Embedder

if TYPE_CHECKING:
    from app.guard.base import DetectorScores

# (answer, retrieved context) -> RailResult, sync or async. Written by the RAG engineer.
GroundingCheck = Callable[[str, list[str]], "RailResult | Awaitable[RailResult]"]


@dataclass
class TurnContext:
    messages: list[dict[str, str]]
    embedding: np.ndarray | None = None
    scores: DetectorScores | None = None
    answer: str | None = None
    context: list[str] | None = None
    results: list[RailResult] = field(default_factory=list)
    blocked_intent: str | None = None


current_turn: contextvars.ContextVar[TurnContext] = contextvars.ContextVar("guardchat_turn")


def _turn() -> TurnContext:
    try:
        return current_turn.get()
    except LookupError as exc:  # a flow run outside RailsGuard: nothing to check against
        raise RuntimeError("guardchat actions run only inside RailsGuard") from exc


def last_user_text(messages: list[dict[str, str]]) -> str:
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


async def _topic(
    cascade: SafetyCascade, embedder: Embedder | None, turn: TurnContext, embedding: np.ndarray
) -> tuple[RailResult, str | None]:
    """The topic verdict and its blocked intent. The only rail that reads the conversation: a message it refuses
    alone may be an on-domain follow-up (app/guard/topic_followup.py)."""
    result, intent = cascade.topic(embedding, turn.scores)
    if result.verdict != "block":
        return result, intent
    return await topic_in_context(cascade, embedder, turn.messages, embedding, turn.scores, result, intent)


async def _grounded(grounding: GroundingCheck | None, turn: TurnContext) -> RailResult:
    started = time.perf_counter()
    if grounding is None or not turn.context:
        return RailResult("groundedness", "skip", detail="no grounding check or no retrieved context")
    try:
        result: Any = grounding(turn.answer or "", list(turn.context))
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, RailResult):
            raise TypeError(f"grounding check returned {type(result).__name__}, not RailResult")
    except Exception as exc:
        result = RailResult("groundedness", "error", detail=f"guard_error: {exc}")
    result.latency_ms = result.latency_ms or (time.perf_counter() - started) * 1000
    return result


def build_actions(
    cascade: SafetyCascade,
    *,
    fail_open: bool,
    grounding: GroundingCheck | None = None,
    embedder: Embedder | None = None,
) -> dict[str, Callable[..., Awaitable[str]]]:
    """The actions for one rails config, bound to its cascade. `embedder` lets the topic rail judge a follow-up in
    its conversation (app/guard/topic_followup.py); without it every message is judged alone."""

    def outcome(result: RailResult) -> str:
        _turn().results.append(result)
        if result.verdict == "error" and fail_open:
            return "allow"
        return "allow" if result.verdict in ("allow", "flag", "skip") else result.verdict

    async def guardchat_check_input_safety() -> str:
        turn = _turn()
        conversation = conversation_from_messages(turn.messages)
        return outcome(await cascade.safety("safety_input", conversation, "User", turn.scores, turn.embedding))

    async def guardchat_check_attack() -> str:
        turn = _turn()
        if turn.embedding is None:
            return outcome(RailResult("attack", "error", detail="guard_error: no query embedding"))
        conversation = conversation_from_messages(turn.messages)
        return outcome(await cascade.attack(turn.embedding, turn.scores, conversation))

    async def guardchat_check_topic() -> str:
        turn = _turn()
        if turn.embedding is None:
            return outcome(RailResult("topic", "error", detail="guard_error: no query embedding"))
        result, intent = await _topic(cascade, embedder, turn, turn.embedding)
        verdict = outcome(result)
        if result.verdict == "block" and intent:
            turn.blocked_intent = intent
            return intent
        return verdict

    async def guardchat_check_output_safety() -> str:
        turn = _turn()
        # Only the user's question gives the answer its context; earlier turns were checked already.
        conversation = [("User", last_user_text(turn.messages)), ("Agent", turn.answer or "")]
        return outcome(await cascade.safety("safety_output", conversation, "Agent", turn.scores))  # type: ignore[arg-type]

    async def guardchat_check_groundedness() -> str:
        return outcome(await _grounded(grounding, _turn()))

    return {
        "guardchat_check_input_safety": guardchat_check_input_safety,
        "guardchat_check_attack": guardchat_check_attack,
        "guardchat_check_topic": guardchat_check_topic,
        "guardchat_check_output_safety": guardchat_check_output_safety,
        "guardchat_check_groundedness": guardchat_check_groundedness,
    }
