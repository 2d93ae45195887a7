"""The data a turn takes and gives (request, result, streamed events), its stage timer, what its stages share
(`TurnScope`, `StreamedAnswer`), and the pure helpers that turn a request and a stored history into prompt
messages. The pipeline itself is app/pipeline/turn.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.guard.base import AssistantTexts, Guard, GuardDecision, RailResult
from app.pipeline.streaming import Finished
from app.sessions.base import OpenTurn, Turn
from app.state import LoadedRails


class TurnInputError(ValueError):
    """The request cannot form a turn (e.g. no user message). The API answers 400."""


@dataclass
class TurnRequest:
    messages: list[dict[str, str]]
    session_id: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    adapter: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stream: bool = True  # False: nobody watches tokens arrive, so output rails check 4-chunk windows
    # The API's ownership rule: with `check_owner`, a session continues only for the `owner` that created it
    # (anyone else gets SessionNotFound, as if it did not exist). Checked in the same round trip that locks the
    # session and reads its history.
    owner: str | None = None
    check_owner: bool = False


@dataclass
class TurnResult:
    answer: str
    blocked: bool
    session_id: str | None
    turn_id: str
    rails: list[RailResult] = field(default_factory=list)
    citations: list[dict[str, Any]] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = "ok"

    def guardchat(self) -> dict[str, Any]:
        """The extra `guardchat` object every chat response carries."""
        return {
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "blocked": self.blocked,
            "rails": [r.to_dict() for r in self.rails],
            "citations": self.citations,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    result: TurnResult


class Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.model_spans: list[tuple[float, float]] = []  # app/observability/model_time.py

    @contextlib.contextmanager
    def stage(self, name: str) -> Any:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - start) * 1000


def split_request(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Returns (prior user/assistant messages, the new user message). Client system messages are
    dropped: the system prompt belongs to the rails config, not to the caller."""
    if not messages:
        raise TurnInputError("`messages` must contain at least one message.")
    last = messages[-1]
    if last.get("role") != "user":
        raise TurnInputError("The last message must have role 'user'.")
    text = last.get("content") or ""
    if not text.strip():
        raise TurnInputError("The last user message is empty.")
    prior = [m for m in messages[:-1] if m.get("role") in ("user", "assistant")]
    return prior, text


def history_messages(turns: list[Turn], limit: int) -> list[dict[str, str]]:
    # Blocked turns never go back into a prompt: a refused jailbreak must not steer later answers.
    usable = [t for t in turns if t.status == "ok"][-limit:] if limit > 0 else []
    out: list[dict[str, str]] = []
    for t in usable:
        out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.answer}]
    return out


@dataclass
class TurnScope:
    """What every stage of one turn reads: the request, the rails it started on, its timer and its trace."""

    req: TurnRequest
    history: list[dict[str, str]]
    user_text: str
    session: OpenTurn | None
    timer: Timer
    t_start: float
    rails: LoadedRails
    turn_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    trace: dict[str, Any] = field(default_factory=dict)
    conversation: list[dict[str, str]] = field(default_factory=list)
    about_history: bool = False  # a question about the conversation itself (context.is_about_conversation)

    def __post_init__(self) -> None:
        self.trace.update(rails_version=self.rails.version, request_id=self.req.request_id)
        if self.session is not None:
            self.trace["history_turns"] = len(self.session.history)
        self.conversation = [*self.history, {"role": "user", "content": self.user_text}]

    @property
    def guard(self) -> Guard:
        return self.rails.guard

    @property
    def texts(self) -> AssistantTexts:
        return self.rails.guard.texts


@dataclass
class StreamedAnswer:
    """What the output rails decided once the answer stopped (`final`), what was shown, and the flagging
    groundedness check started when generation ended."""

    final: Finished | None = None
    released: list[str] = field(default_factory=list)
    grounding: asyncio.Task[GuardDecision] | None = None
