"""Compiled rail flows: the per-turn fast path for input/output-only rails configs.

NeMo Guardrails offers two engines. LLMRails interprets the Colang 1.0 flows event by event (≈ 5–7 ms
per `check_async` here, even when every action is instant: `compute_next_state`, `SimpleEval`, event
uuids). IORails compiles each configured rail once and then runs it as one awaited action per request
(≈ 1 ms) — but 0.24.1's IORails serves only the rails of its built-in manifest catalog and refuses a
flow that calls a custom action, which all of ours do (strict Llama Guard parsing, the detector cascade).

So we do what IORails does, for the flows NeMo has already parsed: at config load each rail flow is
compiled from NeMo's own parse tree (the `elements` of `RailsConfig.flows`) into a small program of
steps — run an action into a variable, branch on an expression, say a bot message, stop — and a turn
executes that program directly. Semantics follow NeMo's Colang 1.0 runtime (`sliding.py`): `if` jumps
by `_next_else` when false, `jump` by `_next`, a flow that reaches `stop` blocks the rail with the bot
message it uttered; input rails run concurrently when `rails.input.parallel` is set and the first rail
to block wins. Anything outside this subset (user-intent matching, loops, action parameters, templated
bot messages, ...) makes `compile_rails` return None with a reason, and the guard keeps using NeMo's
LLMRails for that config. tests/guard/test_compiled.py checks that both engines decide the same on
every rails test of the shipped config.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

Action = Callable[[], Awaitable[Any]]
_SIMPLE_COMPARE = re.compile(r'^\s*\$([A-Za-z_]\w*)\s*(==|!=)\s*"([^"\\]*)"\s*$')


class NotCompilable(Exception):
    """The flow uses Colang outside the compiled subset; NeMo's runtime must run it."""


@dataclass(frozen=True)
class RunAction:
    action: Action
    result_key: str | None


@dataclass(frozen=True)
class If:
    test: Callable[[dict[str, Any]], bool]
    next_else: int


@dataclass(frozen=True)
class Jump:
    offset: int


@dataclass(frozen=True)
class Say:
    message: str  # the bot message's text, resolved at compile time


@dataclass(frozen=True)
class Stop:
    pass


Step = RunAction | If | Jump | Say | Stop


@dataclass(frozen=True)
class FlowOutcome:
    flow: str
    blocked: bool
    message: str | None = None  # the bot message uttered before `stop`


def _compile_test(expression: str) -> Callable[[dict[str, Any]], bool]:
    match = _SIMPLE_COMPARE.match(expression)
    if match:  # the common case, without NeMo's SimpleEval (built per call, ~0.1 ms)
        name, op, literal = match.groups()
        if op == "==":
            return lambda variables: variables.get(name) == literal
        return lambda variables: variables.get(name) != literal
    from nemoguardrails.colang.v1_0.runtime.eval import eval_expression

    return lambda variables: bool(eval_expression(expression, dict(variables)))


def _bot_message(name: str, bot_messages: dict[str, list[str]]) -> str:
    variants = bot_messages.get(name)
    if not variants:
        raise NotCompilable(f"bot message {name!r} has no text")
    text = variants[0]
    if len(variants) > 1 or re.search(r"\$[A-Za-z_]|\{\{|\{%", text):
        # NeMo picks a variant at random and renders templates with the context: keep that in NeMo.
        raise NotCompilable(f"bot message {name!r} has several variants or a template")
    return text


def compile_flow(flow: dict[str, Any], actions: dict[str, Action], bot_messages: dict[str, list[str]]) -> list[Step]:
    steps: list[Step] = []
    elements = flow.get("elements") or []
    for element in elements:
        kind = element.get("_type")
        if kind == "run_action" and element.get("action_name") == "utter":
            value = (element.get("action_params") or {}).get("value")
            if not isinstance(value, str):
                raise NotCompilable("utter without a message name")
            steps.append(Stop() if value == "stop" else Say(_bot_message(value, bot_messages)))
        elif kind == "run_action":
            name = element.get("action_name")
            if element.get("action_params"):
                raise NotCompilable(f"action {name!r} takes parameters")
            if name not in actions:
                raise NotCompilable(f"unknown action {name!r}")
            steps.append(RunAction(actions[name], element.get("action_result_key")))
        elif kind == "if":
            steps.append(If(_compile_test(str(element.get("expression"))), int(element["_next_else"])))
        elif kind == "jump" and not element.get("_absolute"):
            steps.append(Jump(int(element["_next"])))
        else:
            raise NotCompilable(f"element {kind!r} is not in the compiled subset")
    # Every jump must land inside the flow (or exactly at its end): no loops, no jumps out.
    for index, step in enumerate(steps):
        offset = step.next_else if isinstance(step, If) else step.offset if isinstance(step, Jump) else 1
        if offset < 1 or index + offset > len(steps):
            raise NotCompilable("a branch jumps backwards or out of the flow")
    return steps


async def run_flow(name: str, steps: list[Step]) -> FlowOutcome:
    variables: dict[str, Any] = {}
    last_message: str | None = None
    head = 0
    while head < len(steps):
        step = steps[head]
        if isinstance(step, RunAction):
            result = await step.action()
            if step.result_key:
                variables[step.result_key] = result
        elif isinstance(step, If):
            if not step.test(variables):
                head += step.next_else
                continue
        elif isinstance(step, Jump):
            head += step.offset
            continue
        elif isinstance(step, Say):
            last_message = step.message
        else:  # Stop
            return FlowOutcome(name, True, last_message)
        head += 1
    return FlowOutcome(name, False)


class FlowEngine(Protocol):
    """What runs a config's input or output rail flows for the turn in `app.guard.actions.current_turn`: our
    compiled flows (`CompiledRails`) or NeMo's LLMRails (`NemoFlows`). `RailsGuard` holds one."""

    @property
    def name(self) -> str:
        """The engine's name in logs, the admin status and `rails validate`: `compiled` or `nemo`."""
        ...

    async def run(
        self, direction: str, messages: list[dict[str, str]], only: set[str] | None = None
    ) -> FlowOutcome | None:
        """The blocking flow's outcome, or None when every flow passes; `messages`: the turn as NeMo reads it."""
        ...


@dataclass(frozen=True)
class CompiledRails:
    input_flows: list[tuple[str, list[Step]]]
    output_flows: list[tuple[str, list[Step]]]
    input_parallel: bool
    output_parallel: bool
    name: str = "compiled"

    async def run(
        self, direction: str, messages: list[dict[str, str]], only: set[str] | None = None
    ) -> FlowOutcome | None:
        """Runs the input or output rails (or `only` the named flows of them); returns the blocking flow's
        outcome, or None when all pass. An action that raises propagates (the guard turns it into a
        guard_error refusal)."""
        flows = self.input_flows if direction == "input" else self.output_flows
        if only is not None:
            flows = [(name, steps) for name, steps in flows if name in only]
        parallel = self.input_parallel if direction == "input" else self.output_parallel
        if not parallel or len(flows) < 2:
            for name, steps in flows:
                outcome = await run_flow(name, steps)
                if outcome.blocked:
                    return outcome
            return None
        # As NeMo's parallel rails: all start at once, the first to block ends the check.
        tasks = [asyncio.ensure_future(run_flow(name, steps)) for name, steps in flows]
        try:
            for next_done in asyncio.as_completed(tasks):
                outcome = await next_done
                if outcome.blocked:
                    return outcome
            return None
        finally:
            for task in tasks:
                task.cancel()


class NemoFlows:
    """NeMo's LLMRails `check_async`: interprets the Colang per event (any config; `only` cannot be honoured, so
    every flow of that direction runs)."""

    name = "nemo"

    def __init__(self, rails: Any) -> None:
        self.rails = rails

    async def run(
        self, direction: str, messages: list[dict[str, str]], only: set[str] | None = None
    ) -> FlowOutcome | None:
        from nemoguardrails.rails.llm.options import RailStatus, RailType

        rail_type = RailType.INPUT if direction == "input" else RailType.OUTPUT
        result = await self.rails.check_async(messages, rail_types=[rail_type])
        if result.status != RailStatus.BLOCKED:
            return None
        return FlowOutcome(result.rail or "", True, result.content)


def compile_rails(rails_config: Any, actions: dict[str, Action]) -> tuple[CompiledRails | None, str | None]:
    """(compiled rails, None), or (None, why not) when NeMo's runtime has to run this config."""
    # Only the input and output rail flows matter: a `check_async` for input or output runs nothing else.
    rails = rails_config.rails

    def compile_all(names: list[str]) -> list[tuple[str, list[Step]]]:
        out = []
        for name in names:
            definitions = [flow for flow in rails_config.flows if flow.get("id") == name]
            if len(definitions) != 1:
                raise NotCompilable(f"flow {name!r} is defined {len(definitions)} times")
            out.append((name, compile_flow(definitions[0], actions, rails_config.bot_messages)))
        return out

    try:
        compiled = CompiledRails(
            input_flows=compile_all(list(rails.input.flows)),
            output_flows=compile_all(list(rails.output.flows)),
            input_parallel=bool(getattr(rails.input, "parallel", False)),
            output_parallel=bool(getattr(rails.output, "parallel", False)),
        )
    except NotCompilable as exc:
        return None, str(exc)
    return compiled, None
