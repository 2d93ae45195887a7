"""The compiled rails engine (app/guard/compiled.py) against NeMo's own LLMRails runtime."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.guard.compiled import CompiledRails, compile_rails
from app.guard.loader import read_rails_files
from app.guard.validate import parse_tests
from tests.guard.conftest import RAILS_DIR, CannedAnswer


def _cases() -> list[Any]:
    errors: list[Any] = []
    cases = parse_tests(read_rails_files(RAILS_DIR), errors)
    assert not errors and len(cases) >= 40
    return cases


async def _decide(guard: Any, embedder: Any, case: Any) -> Any:
    messages = [*case.history, {"role": "user", "content": case.user}]
    if case.answer is not None:
        return await guard.check_output(messages, case.answer, case.context)
    return await guard.check_input(messages, embedder.embed([case.user])[0])


def test_the_shipped_config_compiles(remote_guard) -> None:
    compiled = remote_guard.flows
    assert isinstance(compiled, CompiledRails)
    assert [name for name, _ in compiled.input_flows] == list(remote_guard.loaded.rails_config.rails.input.flows)
    assert compiled.input_parallel is True


async def test_compiled_and_nemo_engines_decide_alike_on_every_rails_test(remote_guard, embedder, lg) -> None:
    """Same verdict, same blocking rail, same refusal text, same rail results, on all shipped rails tests.
    Llama Guard (the stand-in) flags the cases a safety rail must block and every third other one, so that both
    outcomes occur whatever the order of the cases."""
    assert remote_guard.engine_name == "compiled"
    on_nemo = remote_guard.on_llmrails()
    assert on_nemo.engine_name == "nemo" and remote_guard.engine_name == "compiled"  # a twin: the guard is as it was
    disagreements = []
    outcomes: set[str | None] = set()
    seen: dict[str, int] = {}  # cases of each kind so far
    for case in _cases():
        kind = "output" if case.answer is not None else "input"
        seen[kind] = seen.get(kind, 0) + 1
        flagged = (
            any(rail.startswith("safety") for rail in case.rails)
            or seen[kind] % (2 if kind == "output" else 3) == 0
        )
        # A case with history may run the topic rail in context (a thread): a stand-in "unsafe" would then race
        # it to block first, and the rails listed would depend on timing.
        flagged = flagged and not case.history
        answer = "unsafe\nS2" if flagged else "safe"
        results = []
        for guard in (remote_guard, on_nemo):
            lg.queue(answer, answer)
            decision = await _decide(guard, embedder, case)
            lg.reset()
            results.append(
                (
                    decision.allowed,
                    decision.blocked_by,
                    decision.refusal,
                    sorted((r.name, r.verdict) for r in decision.rails),
                )
            )
        if results[0] != results[1]:
            disagreements.append((case.name, results))
        outcomes.add(results[0][1])
    assert not disagreements, disagreements
    assert {None, "safety_input", "safety_output", "topic", "attack"} <= outcomes  # every kind of outcome occurred


async def test_a_failing_guard_refuses_on_the_compiled_engine(remote_guard, embedder, lg) -> None:
    assert isinstance(remote_guard.flows, CompiledRails)
    lg.queue(CannedAnswer(status=500))
    text = "How do I order a new debit card?"
    decision = await remote_guard.check_input([{"role": "user", "content": text}], embedder.embed([text])[0])
    assert not decision.allowed and decision.guard_error
    assert decision.blocked_by == "safety_input"
    assert decision.refusal == remote_guard.texts.guard_error


def _config(colang: str, yaml: str) -> Any:
    from nemoguardrails import RailsConfig

    return RailsConfig.from_content(colang_content=colang, yaml_content=yaml)


FLOWS = """
define bot refuse a
  "A refused."
define bot refuse b
  "B refused."

define flow check a
  $v = execute action_a
  if $v == "block"
    bot refuse a
    stop

define flow check b
  $v = execute action_b
  if $v != "allow"
    bot refuse b
    stop
  else
    $w = execute action_a
"""


def _actions(calls: list[str], a: str, b: str, b_delay: float = 0.0) -> dict[str, Any]:
    async def action_a() -> str:
        calls.append("a")
        return a

    async def action_b() -> str:
        calls.append("b")
        await asyncio.sleep(b_delay)
        return b

    return {"action_a": action_a, "action_b": action_b}


@pytest.mark.parametrize(
    ("a", "b", "blocked_flow", "message"),
    [
        ("allow", "allow", None, None),
        ("block", "allow", "check a", "A refused."),
        ("allow", "x", "check b", "B refused."),
    ],
)
async def test_sequential_flows_follow_colang_branching(a, b, blocked_flow, message) -> None:
    config = _config(FLOWS, "rails:\n  input:\n    flows: [check a, check b]\n")
    calls: list[str] = []
    compiled, why_not = compile_rails(config, _actions(calls, a, b))
    assert compiled is not None, why_not
    outcome = await compiled.run("input", [])
    got = (outcome.flow, outcome.message) if outcome else (None, None)
    assert got == (blocked_flow, message)
    if blocked_flow == "check a":
        assert calls == ["a"]  # sequential: the first block ends the check before `check b` runs
    if blocked_flow is None:
        assert calls == ["a", "b", "a"]  # the else branch ran


async def test_parallel_flows_end_at_the_first_block() -> None:
    config = _config(FLOWS, "rails:\n  input:\n    parallel: true\n    flows: [check b, check a]\n")
    calls: list[str] = []
    compiled, _ = compile_rails(config, _actions(calls, "block", "allow", b_delay=5.0))
    assert compiled is not None
    outcome = await asyncio.wait_for(compiled.run("input", []), 2.0)  # the slow flow is cancelled, not awaited
    assert outcome is not None and outcome.flow == "check a"


@pytest.mark.parametrize(
    ("colang", "reason"),
    [
        (
            'define user greet\n  "hi"\ndefine flow check a\n  user greet\n  bot refuse a\n',
            "not in the compiled subset",
        ),
        ("define flow check a\n  $v = execute action_a(x=1)\n", "takes parameters"),
        ("define flow check a\n  $v = execute nobody_registered_this\n", "unknown action"),
        ('define bot refuse a\n  "Hi $name"\ndefine flow check a\n  bot refuse a\n  stop\n', "template"),
    ],
)
def test_colang_outside_the_subset_stays_on_nemo(colang, reason) -> None:
    config = _config(colang, "rails:\n  input:\n    flows: [check a]\n")
    compiled, why_not = compile_rails(config, _actions([], "allow", "allow"))
    assert compiled is None and why_not is not None and reason in why_not
