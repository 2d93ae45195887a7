"""The safety boundary. A Guard runs the rails of one loaded rails config."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    from app.rag.base import Embedder

Verdict = Literal["allow", "block", "flag", "error", "skip"]


@dataclass
class RailResult:
    """What one rail decided. `name` is stable (metrics and tests key on it)."""

    name: str
    verdict: Verdict
    categories: list[str] = field(default_factory=list)
    score: float | None = None
    latency_ms: float = 0.0
    detail: str | None = None  # e.g. "guard_error: connection refused"

    def to_dict(self) -> dict[str, Any]:
        # Written out: dataclasses.asdict recurses through every field, ~40 µs a rail, ten rails a turn.
        return {
            "name": self.name,
            "verdict": self.verdict,
            "categories": list(self.categories),
            "score": self.score,
            "latency_ms": self.latency_ms,
            "detail": self.detail,
        }


@dataclass
class GuardDecision:
    allowed: bool
    rails: list[RailResult] = field(default_factory=list)
    blocked_by: str | None = None
    refusal: str | None = None  # the text the user sees when blocked

    @property
    def guard_error(self) -> bool:
        return any(r.verdict == "error" for r in self.rails)


@dataclass
class AssistantTexts:
    """Texts an admin configures in the rails config (never hard-coded in the pipeline)."""

    system_prompt: str = "You are a helpful assistant."
    refusal: str = "Sorry, I can't help with that."
    idk: str = "I don't know. I couldn't find that in our knowledge base."
    guard_error: str = "Sorry, I can't answer right now: a safety check could not run."


class Guard(Protocol):
    texts: AssistantTexts
    output_chunk_chars: int
    output_context_chars: int
    grounding_blocks: bool  # the config blocks ungrounded answers: windows must be checked with the context

    @property
    def engine_name(self) -> str | None:
        """The engine that runs the checks (iorails | compiled | nemo, docs/rails.md); None: a guard without one."""
        ...

    @property
    def engine_reason(self) -> str | None:
        """Why that engine (logged at load, shown by GET /api/admin/rails/status and `rails validate`)."""
        ...

    def prefetch_input(self, messages: list[dict[str, str]]) -> asyncio.Future[Any] | None:
        """Starts the input checks that need only the text (a remote Llama Guard call, the guard model's pass), so
        they run while the turn embeds its query; `check_input` on the same messages then uses their result.
        Returns the future (the caller cancels it if the turn ends first), or None when there is nothing to start."""
        ...

    async def check_input(self, messages: list[dict[str, str]], embedding: np.ndarray | None = None) -> GuardDecision:
        """`messages` is the conversation ending with the new user message.
        `embedding` is the turn's one MiniLM query embedding (of the last user message)."""
        ...

    async def check_output(
        self, messages: list[dict[str, str]], answer: str, context: list[str] | None = None
    ) -> GuardDecision:
        """Checks the answer so far (or a hold-back window of it). `context` is the retrieved text,
        for the groundedness rail (given per window only when that rail blocks: `grounding_blocks`)."""
        ...

    async def check_groundedness(
        self, messages: list[dict[str, str]], answer: str, context: list[str]
    ) -> GuardDecision:
        """Only the groundedness rail, once on the whole answer (when it flags rather than blocks)."""
        ...

    async def aclose(self) -> None:
        """Closes the guard's own clients (Llama Guard HTTP sessions). Called once no turn uses the guard."""
        ...


# The stage-1 classifier's scores, thresholds and protocol: shared by the fine-tuned guard model
# (app/guard/guard_model.py) and the linear detector (app/guard/detector.py), which picks between them.
@dataclass
class DetectorScores:
    unsafe: float  # P(the text is a harmful request / content), 0..1, calibrated
    categories: dict[str, float]  # "S1".."S14" -> P(category | unsafe); may be zeros for a safe text
    attack: float  # P(jailbreak or prompt injection / instruction override / system-prompt extraction)
    off_topic: float  # P(outside the bank-support domain, incl. investment/legal/tax advice requests)
    topic: str  # argmax of TOPIC_LABELS
    latency_ms: float
    windows: int = 1  # how many windows were scored (1 for short texts)
    topic_probs: dict[str, float] = field(default_factory=dict)


@dataclass
class DetectorThresholds:
    """Stored with the weights; the rails config may override them."""

    unsafe_block: float  # >= -> block without asking the judge
    unsafe_allow: float  # <  -> allow without asking the judge; in between = uncertain band -> LLM judge
    attack_block: float
    attack_allow: float
    off_topic_block: float


class Classifier(Protocol):
    """What the rails ask of a stage-1 classifier: the fine-tuned guard (app/guard/guard_model.py, the default)
    or the linear heads on MiniLM embeddings below (`GUARDCHAT_GUARD_CLASSIFIER=linear`)."""

    kind: str
    thresholds: DetectorThresholds

    def score(self, text: str, embedder: Embedder, embedding: np.ndarray | None = None) -> DetectorScores: ...

    def score_many(self, texts: list[str], embedder: Embedder) -> list[DetectorScores]: ...
