"""NeMo's IORails engine, for a rails config made only of NeMo catalog input/output rails.

IORails (NeMo 0.24.1) compiles each configured catalog rail (`llama guard check input`, `self check
input`, `regex check input`, ...; whatever `nemoguardrails/library/*/rail.py` declares) into one awaited
library action and calls the config's `models:` over HTTP (OpenAI /v1/chat/completions, aiohttp). No Colang
runtime runs per request: ~2 ms per check against a local model server, where LLMRails takes ~10-15 ms.
`IORails.unsupported_reason` decides which configs it serves: only input/output (and tool) rails, every flow
a catalog surface. The shipped config calls our own actions, so it never runs here (app/guard/compiled.py).

A check calls IORails' own `rails_manager.is_input_safe / is_output_safe` — the same call `check_async`
makes — rather than `check_async` itself: `check_async` reduces the outcome to a status, NeMo's fixed
refusal text and a rail name, dropping what the guard must show: whether the rail *broke* (`failed`) or
decided, and its metadata (Llama Guard's violated categories). What that skips is IORails' admission queue
and request span; the server has its own limits and metrics. We start and stop the engine ourselves.

Semantics, as the other engines:
- a block refuses with the config's `refuse to respond` text (what LLMRails says for a catalog rail);
- fail closed: a rail that raised (NeMo turns it into a `failed` block), an upstream HTTP error (NeMo
  re-raises it), a timeout, or a Llama Guard verdict that is neither `safe` nor `unsafe` (NeMo blocks it as
  an ordinary refusal) is verdict `error`, detail `guard_error: ...`, refused with the guard-error text;
  with `guard_fail_open` the broken rail is recorded and the remaining rails run without it;
- the config's models get the guard's timeout and a single attempt unless they set `timeout` /
  `max_attempts` themselves (a retry costs more latency than failing closed does);
- no usage report: besides the env opt-out set by app/guard/__init__.py, the engine is built with
  `_report_usage=False`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import app.guard  # noqa: F401  (NeMo telemetry opt-out)
from app.guard.base import AssistantTexts, GuardDecision, RailResult

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

_LLAMA_GUARD_FLOWS = ("llama guard check input", "llama guard check output")


def flow_name(flow: str) -> str:
    """A configured flow without its `$model=...` suffix: the name IORails reports a block under."""
    from nemoguardrails.rails.llm.config import _get_flow_name

    return _get_flow_name(flow) or flow


def _serving_config(rails_config: Any, settings: Settings) -> Any:
    """The config IORails gets: without the embeddings model the loader injects (a local SentenceTransformers
    path, which IORails would try to reach over HTTP), and with the guard's timeout and no retries as
    defaults for every model."""
    models = []
    for model in rails_config.models:
        if model.type == "embeddings":
            continue
        parameters = dict(model.parameters or {})
        parameters.setdefault("timeout", settings.guard_timeout_s)
        parameters.setdefault("timeout_connect", min(settings.llm_connect_timeout_s, settings.guard_timeout_s))
        parameters.setdefault("max_attempts", 1)
        models.append(model.model_copy(update={"parameters": parameters}))
    return rails_config.model_copy(update={"models": models})


class IORailsEngine:
    """One config's IORails engine, mapped onto the Guard's decisions."""

    def __init__(self, engine: Any, texts: AssistantTexts, *, fail_open: bool) -> None:
        self._engine = engine
        self._texts = texts
        self._fail_open = fail_open
        self._start_lock = asyncio.Lock()

    @classmethod
    def build(cls, rails_config: Any, settings: Settings, texts: AssistantTexts) -> tuple[IORailsEngine | None, str]:
        """(engine, why) when IORails serves this config, else (None, why not)."""
        from nemoguardrails.guardrails.iorails import IORails

        config = _serving_config(rails_config, settings)
        if not (config.rails.input.flows or config.rails.output.flows):
            return None, "the config has no input or output rails"
        reason = IORails.unsupported_reason(config)
        if reason is not None:
            return None, reason
        engine = IORails(config, _report_usage=False)
        rewriting = sorted(flow for flows in engine.rails_manager.transform_flows.values() for flow in flows)
        if rewriting:
            # The Guard protocol allows or refuses; it has no way to hand a rewritten message back.
            return None, f"rails {rewriting} rewrite the text, which the guard cannot apply"
        flows = [*config.rails.input.flows, *config.rails.output.flows]
        return cls(engine, texts, fail_open=settings.guard_fail_open), f"every rail is a NeMo catalog rail: {flows}"

    async def check(self, messages: list[dict[str, str]], answer: str | None = None) -> GuardDecision:
        """The input rails on `messages` (ending with the user message), or the output rails on `answer`."""
        direction = "input" if answer is None else "output"
        checked = answer if answer is not None else _last_user_text(messages)
        if not checked:
            # As IORails' check: its library actions need the text and would block an empty one.
            return GuardDecision(allowed=True)
        started = time.perf_counter()
        manager = self._engine.rails_manager
        configured = list(manager.input_flows if answer is None else manager.output_flows)
        rails: list[RailResult] = []
        skipped: list[str] = []
        while True:
            enabled: bool | list[str] = [f for f in configured if flow_name(f) not in skipped] if skipped else True
            if skipped and not enabled:
                return GuardDecision(True, rails)
            try:
                await self._started()
                if answer is None:
                    result = await manager.is_input_safe(list(messages), enabled=enabled)
                else:
                    result = await manager.is_output_safe(list(messages), answer, enabled=enabled)
            except Exception as exc:  # an upstream HTTP error propagates out of the rail
                log.warning("%s rails failed on IORails: %s", direction, exc)
                detail = f"guard_error: {exc}"
                rails.append(RailResult(f"{direction}_rails", "error", latency_ms=_ms(started), detail=detail))
                if self._fail_open:
                    return GuardDecision(True, rails)
                return GuardDecision(False, rails, f"{direction}_rails", self._texts.guard_error)
            rails += [_rail_result(record) for record in result.records]
            if result.is_safe:
                return GuardDecision(True, rails)
            blocked_by = result.triggered_rail or f"{direction}_rails"
            blocking = next((r for r in reversed(rails) if r.name == blocked_by), None)
            if blocking is None:
                blocking = RailResult(blocked_by, "block", detail=result.reason)
                rails.append(blocking)
            if result.failed:  # the rail raised; NeMo's reason is its redacted error
                blocking.verdict, blocking.detail = "error", f"guard_error: {result.reason or 'the rail failed'}"
            if blocking.verdict != "error":
                return GuardDecision(False, rails, blocked_by, self._texts.refusal)
            if not self._fail_open:
                return GuardDecision(False, rails, blocked_by, self._texts.guard_error)
            skipped.append(blocked_by)  # fail open: the broken rail is recorded, the others still decide

    async def _started(self) -> None:
        # Lazily, on the serving loop: the engine's aiohttp sessions belong to the loop that starts them.
        if not self._engine._running:
            async with self._start_lock:
                await self._engine.start()

    async def aclose(self) -> None:
        await self._engine.stop()


def _last_user_text(messages: list[dict[str, str]]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _rail_result(record: Any) -> RailResult:
    """One IORails rail record as our RailResult (name = the flow, as the other engines name catalog rails)."""
    verdict: dict[str, Any] = record.return_value if isinstance(record.return_value, dict) else {}
    name = flow_name(record.flow)
    latency = (record.duration or 0.0) * 1000
    violations = verdict.get("policy_violations")
    categories = [str(v).upper() for v in violations or [] if str(v).strip()]
    if verdict.get("failed"):
        return RailResult(name, "error", latency_ms=latency, detail="guard_error: the rail failed")
    if record.is_safe:
        return RailResult(name, "allow", latency_ms=latency)
    if name in _LLAMA_GUARD_FLOWS and violations == []:
        # NeMo's parser returns no categories only for a reply that is neither `safe` nor `unsafe ...`.
        detail = f"guard_error: unparseable Llama Guard verdict {str(record.completion or '')[:80]!r}"
        return RailResult(name, "error", latency_ms=latency, detail=detail)
    return RailResult(name, "block", categories=categories, latency_ms=latency)
