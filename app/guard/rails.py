"""RailsGuard: one loaded rails config running on NeMo Guardrails (Colang 1.0) with our actions.

Everything that depends only on the config is built once in `build_guard`: the RailsConfig, the
LLMRails engine with our actions registered, the Llama Guard prompt categories and grammar, the
embedded topic/attack examples. A turn only sets its context and asks NeMo to run the input or
the output rails (`check_async`, which runs nothing else: no dialog rails, no LLM call of its own).

Engines (`rails_engine`), the fastest that can run the config, chosen and logged at load (`engine_name`):
1. `iorails`: NeMo's IORails (app/guard/iorails_engine.py), when every rail is a NeMo catalog input/output
   rail (`IORails.unsupported_reason` is None): one awaited library action per rail, no Colang runtime.
   In 0.24.1 it refuses any flow calling a custom action, so it never runs the shipped config.
2. `compiled`: as IORails does for its catalog, `app/guard/compiled.py` compiles our input/output rail
   flows once, from NeMo's own parse of the Colang, and a turn runs them as plain awaited actions.
3. `nemo`: NeMo's LLMRails `check_async` (`rails.input.parallel` honoured), which interprets Colang per
   event, ≈ 5–7 ms per check even with instant actions; Colang outside the compiled subset runs here.
`rails_engine=auto` (default) tries them in that order, `compiled` skips IORails, `nemo` forces LLMRails.
All engines refuse with the config's texts and fail closed alike. IORails runs a whole check itself
(`RailsGuard.iorails`); the other two run our flows behind one protocol, `FlowEngine` (`RailsGuard.flows`:
`CompiledRails` or `NemoFlows`, app/guard/compiled.py). `on_llmrails()` gives a twin of a guard on LLMRails, for
`rails validate` to compare; the guard itself never changes engine.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import app.guard  # noqa: F401  (NeMo telemetry opt-out)
from app.guard.actions import GroundingCheck, TurnContext, build_actions, current_turn, last_user_text
from app.guard.base import AssistantTexts, GuardDecision, RailResult
from app.guard.cascade import (
    ATTACK_CATEGORY,
    IntentMatcher,
    SafetyCascade,
    quietly_done,
    score_in_thread,
)
from app.guard.compiled import FlowEngine, NemoFlows, compile_rails
from app.guard.detector import text_windows
from app.guard.iorails_engine import IORailsEngine, flow_name
from app.guard.llama_guard import LlamaGuardClient, conversation_from_messages
from app.guard.loader import GroundednessSpec, LoadedConfig, load_config
from app.guard.thresholds import Thresholds
from app.llm.base import ChatBackend
from app.rag.base import Embedder
from app.rag.embedder import bundled_model_path
from app.settings import Settings

if TYPE_CHECKING:
    from app.guard.base import Classifier, DetectorScores

log = logging.getLogger(__name__)

# The guard model's scores of a turn's user message, started by `prefetch_input` (by text). A context variable:
# the turn's rail tasks inherit it, and turns never share one.
_prefetched_scores: contextvars.ContextVar[dict[str, asyncio.Future[DetectorScores]] | None] = (
    contextvars.ContextVar("guardchat_prefetched_scores", default=None)
)

# The shipped flows and the stable rail names their actions record (metrics and tests key on them).
SAFETY_INPUT_FLOW = "guardchat check input safety"
FLOW_RAILS = {
    SAFETY_INPUT_FLOW: "safety_input",
    "guardchat check attack": "attack",
    "guardchat check topic": "topic",
    "guardchat check output safety": "safety_output",
    "guardchat check groundedness": "groundedness",
}
# What LLMRails utters when a rail's action raised (NeMo's `inform internal error occurred`).
NEMO_INTERNAL_ERROR = "I'm sorry, an internal error has occurred."


class RailsGuard:
    """Implements app.guard.base.Guard for one rails config."""

    def __init__(
        self,
        loaded: LoadedConfig,
        settings: Settings,
        *,
        cascade: SafetyCascade,
        embedder: Embedder,
        detector: Classifier | None,
        grounding: GroundingCheck | None = None,
        owned_clients: list[ChatBackend] | None = None,
    ) -> None:
        from nemoguardrails import LLMRails

        self.loaded = loaded
        self.texts: AssistantTexts = loaded.texts
        self.output_chunk_chars = settings.output_rails_chunk_chars
        self.output_context_chars = settings.output_rails_context_chars
        self.fail_open = settings.guard_fail_open
        self.mode = cascade.mode
        self.cascade = cascade
        self._embedder = embedder
        self._detector = detector
        self._owned_clients = owned_clients or []
        self._rails = LLMRails(loaded.rails_config)
        actions = build_actions(cascade, fail_open=self.fail_open, grounding=grounding, embedder=embedder)
        for name, action in actions.items():
            self._rails.register_action(action, name)
        spec = loaded.section.groundedness
        self.grounding_blocks = "block" in (spec.action, spec.facts)
        # IORails runs a whole catalog-only check itself; otherwise `flows` runs the flows with our actions.
        self.iorails: IORailsEngine | None = None
        self.flows: FlowEngine = NemoFlows(self._rails)
        self.engine_reason = "rails_engine=nemo"
        if settings.rails_engine == "auto":
            self.iorails, self.engine_reason = IORailsEngine.build(loaded.rails_config, settings, self.texts)
        if self.iorails is None and settings.rails_engine != "nemo":
            why_not_iorails = f"not IORails: {self.engine_reason}; " if settings.rails_engine == "auto" else ""
            compiled, why_not = compile_rails(loaded.rails_config, dict(actions))
            self.flows = compiled or self.flows
            self.engine_reason = why_not_iorails + (
                "the rail flows compile" if compiled else f"the config cannot be compiled: {why_not}"
            )
        log.info("rails engine: %s (%s)", self.engine_name, self.engine_reason)
        rails_cfg = loaded.rails_config.rails
        self.has_input_rails = bool(rails_cfg.input.flows)
        self.has_output_rails = bool(rails_cfg.output.flows)
        # Our input safety rail on a remote Llama Guard can be asked before the turn's embedding exists. (A
        # config with our own flows never runs on IORails, which takes only NeMo catalog rails.)
        self._prefetches_safety = SAFETY_INPUT_FLOW in rails_cfg.input.flows

    @property
    def engine(self) -> Any:
        """The NeMo LLMRails instance (for validation and introspection)."""
        return self._rails

    @property
    def engine_name(self) -> str:
        """The engine a turn runs on: `iorails`, `compiled` or `nemo` (why: `engine_reason`)."""
        return "iorails" if self.iorails else self.flows.name

    def on_llmrails(self) -> RailsGuard:
        """This guard with every check on NeMo's LLMRails (`rails validate` compares the engines); this one is left
        as it is. It shares this guard's clients: close this one, not it."""
        twin = copy.copy(self)
        twin.iorails, twin.flows = None, NemoFlows(self._rails)
        return twin

    @property
    def files(self) -> dict[str, str]:
        return self.loaded.files

    def prefetch_input(self, messages: list[dict[str, str]]) -> asyncio.Future[Any] | None:
        """Starts what needs only the text, so it overlaps the turn's embedding: the remote Llama Guard call, and
        the fine-tuned guard model's pass (it reads the text, not the embedding; 2 cores run both at once)."""
        tasks: list[asyncio.Future[Any]] = []
        if self._detector is not None and self._detector.kind == "finetuned" and self.iorails is None:
            text = last_user_text(messages)
            task = asyncio.ensure_future(score_in_thread(self._detector, text, self._embedder, None))
            task.add_done_callback(quietly_done)
            _prefetched_scores.set({text: task})
            tasks.append(task)
        if self._prefetches_safety:
            remote = self.cascade.prefetch(conversation_from_messages(messages), "User")
            tasks += [remote] if remote is not None else []
        if len(tasks) <= 1:
            return tasks[0] if tasks else None
        both = asyncio.ensure_future(asyncio.gather(*tasks))
        both.add_done_callback(quietly_done)
        return both

    async def check_input(self, messages: list[dict[str, str]], embedding: np.ndarray | None = None) -> GuardDecision:
        if not self.has_input_rails:
            return GuardDecision(allowed=True)
        if self.iorails is not None:  # catalog rails: no detector, no embedding
            return await self.iorails.check(messages)
        user_text = last_user_text(messages)
        started = time.perf_counter()
        try:
            if embedding is None:  # callers normally pass the turn's one embedding
                embedding = (await asyncio.to_thread(self._embedder.embed, [user_text]))[0]
            scores = await self._score(user_text, embedding) if self._detector else None
        except Exception as exc:
            return self._failed("input_rails", exc, started)
        turn = TurnContext(messages=list(messages), embedding=embedding, scores=scores)
        return await self._run(turn, [{"role": "user", "content": user_text}], "input")

    async def _score(self, text: str, embedding: np.ndarray) -> DetectorScores:
        assert self._detector is not None
        prefetched = (_prefetched_scores.get() or {}).pop(text, None)
        if prefetched is not None:
            return await prefetched
        # Linear heads on a short text have nothing left to embed (~0.1 ms): not worth a thread hop. The fine-tuned
        # guard runs its encoder (ms): off the event loop.
        if self._detector.kind == "linear" and len(text_windows(text)) == 1:
            return self._detector.score(text, self._embedder, embedding)
        return await score_in_thread(self._detector, text, self._embedder, embedding)

    async def check_output(
        self, messages: list[dict[str, str]], answer: str, context: list[str] | None = None
    ) -> GuardDecision:
        if not self.has_output_rails:
            return GuardDecision(allowed=True)
        if self.iorails is not None:
            return await self.iorails.check(messages, answer)
        started = time.perf_counter()
        scores = None
        if self.mode == "embedded" and self._detector is not None and answer.strip():
            try:
                scores = await score_in_thread(self._detector, answer, self._embedder, None)
            except Exception as exc:
                return self._failed("output_rails", exc, started)
        return await self._run_output(messages, answer, context, scores)

    async def check_groundedness(
        self, messages: list[dict[str, str]], answer: str, context: list[str]
    ) -> GuardDecision:
        """Only the groundedness flow(s), once on the final answer. (On the NeMo engine, which cannot run one
        output flow alone, all output rails run again on the answer.)"""
        flows = {flow for flow, rail in FLOW_RAILS.items() if rail == "groundedness"}
        if not self.has_output_rails or not flows & set(self.loaded.rails_config.rails.output.flows):
            return GuardDecision(allowed=True)
        return await self._run_output(messages, answer, context, None, only=flows)

    async def _run_output(
        self,
        messages: list[dict[str, str]],
        answer: str,
        context: list[str] | None,
        scores: DetectorScores | None,
        only: set[str] | None = None,
    ) -> GuardDecision:
        turn = TurnContext(messages=list(messages), answer=answer, context=context, scores=scores)
        nemo_messages = [
            {"role": "user", "content": last_user_text(messages)},
            {"role": "assistant", "content": answer},
        ]
        return await self._run(turn, nemo_messages, "output", only=only)

    async def _run(
        self, turn: TurnContext, nemo_messages: list[dict[str, str]], direction: str, only: set[str] | None = None
    ) -> GuardDecision:
        started = time.perf_counter()
        token = current_turn.set(turn)
        try:
            outcome = await self.flows.run(direction, nemo_messages, only)
            blocked = outcome is not None
            flow, content = (outcome.flow, outcome.message) if outcome else ("", None)
        except Exception as exc:
            log.exception("%s rails failed", direction)
            return self._failed(f"{direction}_rails", exc, started, turn.results)
        finally:
            current_turn.reset(token)
        rails = turn.results
        errors = [r for r in rails if r.verdict == "error"]
        if blocked:
            blocked_by = FLOW_RAILS.get(flow) or flow_name(flow)
            # NeMo utters "internal error" for an action that raised; the user gets our guard-error text.
            if blocked_by in FLOW_RAILS.values():
                failed = any(r.name == blocked_by and r.verdict == "error" for r in rails) or not any(
                    r.name == blocked_by for r in rails
                )
            else:  # a NeMo catalog rail (on LLMRails): it records nothing of ours, its utterance tells
                failed = content == NEMO_INTERNAL_ERROR
                if not failed:
                    rails.append(RailResult(blocked_by, "block"))
            refusal = self.texts.guard_error if failed else (content or self.texts.refusal)
            if failed and not any(r.name == blocked_by for r in rails):
                rails.append(RailResult(blocked_by, "error", detail=f"guard_error: rail {flow!r} failed"))
            return GuardDecision(False, rails, blocked_by, refusal)
        if errors and not self.fail_open:
            # Belt and braces: a rail recorded an error but its flow did not stop the turn.
            return GuardDecision(False, rails, errors[0].name, self.texts.guard_error)
        return GuardDecision(True, rails)

    def _failed(
        self, name: str, exc: BaseException, started: float, rails: list[RailResult] | None = None
    ) -> GuardDecision:
        result = RailResult(
            name, "error", latency_ms=(time.perf_counter() - started) * 1000, detail=f"guard_error: {exc}"
        )
        all_rails = [*(rails or []), result]
        if self.fail_open:
            return GuardDecision(True, all_rails)
        return GuardDecision(False, all_rails, name, self.texts.guard_error)

    async def aclose(self) -> None:
        if self.iorails is not None:
            await self.iorails.aclose()
        for client in self._owned_clients:
            await client.aclose()


def build_guard(
    rails_dir: Path | dict[str, str],
    settings: Settings,
    *,
    llm: ChatBackend,
    embedder: Embedder,
    detector: Classifier | None = None,
    grounding: GroundingCheck | None = None,
    embedding_model_path: str | None = None,
) -> RailsGuard:
    """Load one rails config (a directory, or in-memory files for drafts) and build its guard.
    Raises loader.RailsConfigError (with file:line problems) for an invalid config."""
    loaded = load_config(rails_dir, embedding_model_path or bundled_model_path())
    section = loaded.section
    owned: list[ChatBackend] = []
    judge_backend: Any
    if settings.guard_backend == "openai":
        if not settings.guard_url or not settings.guard_model:
            raise ValueError("guard_backend=openai needs guard_url and guard_model")
        from app.llm.client import OpenAICompatClient

        api_key = settings.guard_api_key.get_secret_value() if settings.guard_api_key else None
        judge_backend = OpenAICompatClient(
            settings.guard_url,
            settings.guard_model,
            api_key=api_key,
            timeout_s=settings.guard_timeout_s,
            connect_timeout_s=min(settings.llm_connect_timeout_s, settings.guard_timeout_s),
            max_retries=0,  # a retry would blow the turn's latency budget; failing closed is the answer
        )
        owned.append(judge_backend)
    else:
        judge_backend = llm
    # The embedded (CPU) judge decodes under a grammar and reads a bounded slice; a remote Llama Guard reads all.
    embedded_judge = settings.guard_backend != "openai"
    judge_budget = settings.guard_judge_max_chars if embedded_judge else None
    judge = LlamaGuardClient(
        judge_backend,
        loaded.categories,
        timeout_s=settings.guard_timeout_s,
        use_grammar=embedded_judge,
        budget_chars=judge_budget,
    )
    cascade = SafetyCascade(
        mode=settings.guard_backend,
        judge=judge,
        detector=detector,
        thresholds=Thresholds.resolve(detector, section.thresholds),
        topic_matcher=IntentMatcher(section.topic, loaded.user_examples, embedder),
        attack_matcher=IntentMatcher(section.attack, loaded.user_examples, embedder),
        topic_labels=dict(section.topic.detector_labels),
        safety_matcher=IntentMatcher(section.safety, loaded.user_examples, embedder),
        categories_in_force=frozenset(c.code for c in loaded.categories),
        attack_judge=LlamaGuardClient(
            judge_backend,
            [ATTACK_CATEGORY],
            timeout_s=settings.guard_timeout_s,
            use_grammar=embedded_judge,
            budget_chars=judge_budget,
        ),
    )
    if grounding is not None:
        grounding = _bind_grounding_policy(grounding, section.groundedness, llm, loaded.texts)
    if settings.guard_fail_open:
        log.warning("GUARD FAIL-OPEN IS ON: turns pass when a safety check cannot run. Never use this in production.")
    return RailsGuard(
        loaded,
        settings,
        cascade=cascade,
        embedder=embedder,
        detector=detector,
        grounding=grounding,
        owned_clients=owned,
    )


def _bind_grounding_policy(
    grounding: GroundingCheck, spec: GroundednessSpec, llm: ChatBackend, texts: AssistantTexts
) -> GroundingCheck:
    """The server's grounding check with this config's threshold and action. The LLM judge is consulted only
    when it can change what the user sees: before blocking an answer whose sentences scored low. The turn's
    question and the "I don't know" text (its contact line) may supply an answer's facts (app/rag/facts.py)."""
    from app.rag.grounding import CachedGroundingCheck, make_llm_judge

    if not isinstance(grounding, CachedGroundingCheck):
        return grounding
    judge = make_llm_judge(llm) if spec.judge and spec.action == "block" else None
    bound = functools.partial(
        grounding, threshold=spec.threshold, action=spec.action, judge=judge, trusted=(texts.idk,),
        idk_text=texts.idk, facts_action=spec.facts,
    )

    async def check(answer: str, context: list[str]) -> RailResult:
        turn = current_turn.get(None)  # set while the rails run; absent when called directly
        return await bound(answer, context, question=last_user_text(turn.messages) if turn is not None else "")

    return check
