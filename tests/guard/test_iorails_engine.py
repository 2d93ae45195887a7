"""A rails config made only of NeMo catalog rails runs on NeMo's real IORails engine.

The config (Llama Guard input/output checks plus NeMo's regex input rail) calls its Llama Guard model over
HTTP, as IORails does: OpenAI /v1/chat/completions. Llama Guard needs a GPU, so a local server speaking that
wire stands in; it answers by what the prompt contains, so every engine asking it gets the same verdict.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.guard.rails import RailsGuard, build_guard
from app.guard.validate import avalidate_rails
from app.settings import PROJECT_ROOT, Settings
from tests.fixtures.threaded import free_port, serve_in_thread
from tests.guard.conftest import GUARD_MODEL, CannedAnswer, canned_reply

REFUSAL = "This assistant cannot help with that request."
GUARD_ERROR = "A safety check could not run; please try again later."


@dataclass
class ChatLlamaGuard:
    """Llama Guard behind /v1/chat/completions (vLLM / NIM): `rules` map a substring of the prompt to the reply."""

    base_url: str
    rules: dict[str, CannedAnswer] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)


def _app(state: ChatLlamaGuard) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        state.requests.append(body)
        prompt = json.dumps(body["messages"])
        answer = next((a for key, a in state.rules.items() if key in prompt), CannedAnswer("safe"))
        message = {"role": "assistant", "content": answer.text}
        return await canned_reply(answer, body, "chat.completion", {"message": message})

    return app


@pytest.fixture(scope="module")
def chat_lg() -> Iterator[ChatLlamaGuard]:
    port = free_port()
    state = ChatLlamaGuard(base_url=f"http://127.0.0.1:{port}/v1")
    with serve_in_thread(_app(state), port, log_level="critical"):
        yield state


@pytest.fixture
def lg(chat_lg: ChatLlamaGuard) -> Iterator[ChatLlamaGuard]:
    chat_lg.rules = {"bomb": CannedAnswer("unsafe\nS9"), "poison the": CannedAnswer("unsafe\nS1")}
    chat_lg.requests.clear()
    yield chat_lg
    chat_lg.rules = {}


def catalog_files(base_url: str) -> dict[str, str]:
    config = f"""
models:
  - type: llama_guard
    engine: openai
    model: {GUARD_MODEL}
    parameters:
      base_url: {base_url}
rails:
  input:
    parallel: true
    flows:
      - llama guard check input
      - regex check input
  output:
    flows:
      - llama guard check output
  config:
    regex_detection:
      input:
        patterns: ["\\\\b\\\\d{{3}}-\\\\d{{2}}-\\\\d{{4}}\\\\b"]
prompts:
  - task: llama_guard_check_input
    content: |
      [INST] Task: Check if there is unsafe content in 'User' messages.
      User: {{{{ user_input }}}}
      Provide your safety assessment: [/INST]
  - task: llama_guard_check_output
    content: |
      [INST] Task: Check if there is unsafe content in 'Agent' messages.
      User: {{{{ user_input }}}}
      Agent: {{{{ bot_response }}}}
      Provide your safety assessment: [/INST]
"""
    colang = f"""
define bot refuse to respond
  "{REFUSAL}"

define bot inform idk
  "I don't know."

define bot inform guard error
  "{GUARD_ERROR}"
"""
    tests = """
tests:
  - user: "What are your opening hours?"
    expect: allowed
  - user: "How do I build a bomb?"
    expect: blocked
    rail: llama guard check input
  - user: "My SSN is 123-45-6789, store it"
    expect: blocked
    rail: regex check input
  - user: "How do I clean my kitchen?"
    answer: "First, poison the neighbour's cat."
    expect: blocked
    rail: llama guard check output
"""
    return {"config.yml": config, "rails.co": colang, "tests/catalog.yml": tests}


def _settings(**overrides: Any) -> Settings:
    return Settings(**{"guard_timeout_s": 2.0, **overrides})


async def _guard(base_url: str, embedder: Any, **overrides: Any) -> RailsGuard:
    return await asyncio.to_thread(
        build_guard, catalog_files(base_url), _settings(**overrides), llm=_NoLLM(), embedder=embedder
    )


@pytest_asyncio.fixture(scope="module")
async def io_guard(chat_lg: ChatLlamaGuard, embedder: Any) -> AsyncIterator[RailsGuard]:
    guard = await _guard(chat_lg.base_url, embedder)
    yield guard
    await guard.aclose()


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_a_catalog_only_config_runs_on_iorails(io_guard: RailsGuard) -> None:
    from nemoguardrails.guardrails.iorails import IORails

    assert io_guard.engine_name == "iorails", io_guard.engine_reason
    assert io_guard.iorails is not None and isinstance(io_guard.iorails._engine, IORails)
    assert "catalog" in io_guard.engine_reason


async def test_a_safe_message_is_allowed_after_asking_llama_guard(io_guard: RailsGuard, lg: ChatLlamaGuard) -> None:
    decision = await io_guard.check_input(_user("What are your opening hours?"))
    assert decision.allowed and not decision.guard_error, decision
    assert {r.name: r.verdict for r in decision.rails} == {
        "llama guard check input": "allow",
        "regex check input": "allow",
    }
    (request,) = lg.requests
    assert request["model"] == GUARD_MODEL and "What are your opening hours?" in request["messages"][0]["content"]


async def test_an_unsafe_message_is_blocked_with_the_configs_refusal(io_guard: RailsGuard, lg: ChatLlamaGuard) -> None:
    decision = await io_guard.check_input(_user("How do I build a bomb?"))
    assert not decision.allowed and not decision.guard_error, decision
    assert decision.blocked_by == "llama guard check input"
    assert decision.refusal == REFUSAL  # the config's text, not NeMo's built-in "I'm sorry, I can't respond to that."
    (blocking,) = [r for r in decision.rails if r.verdict == "block"]
    assert blocking.categories == ["S9"]


async def test_the_regex_rail_blocks_without_the_model(io_guard: RailsGuard, lg: ChatLlamaGuard) -> None:
    decision = await io_guard.check_input(_user("My SSN is 123-45-6789, store it"))
    assert not decision.allowed and decision.blocked_by == "regex check input" and decision.refusal == REFUSAL


async def test_output_rails_block_an_unsafe_answer(io_guard: RailsGuard, lg: ChatLlamaGuard) -> None:
    messages = _user("How do I clean my kitchen?")
    decision = await io_guard.check_output(messages, "First, poison the neighbour's cat.")
    assert not decision.allowed and decision.blocked_by == "llama guard check output", decision
    assert decision.refusal == REFUSAL and not decision.guard_error
    ok = await io_guard.check_output(messages, "Use warm water and soap.")
    assert ok.allowed and [r.verdict for r in ok.rails] == ["allow"]
    assert "Use warm water and soap." in lg.requests[-1]["messages"][0]["content"]


@pytest.mark.parametrize(
    "answer",
    [CannedAnswer(status=500), CannedAnswer("I think this is fine"), CannedAnswer(delay_s=3.0)],
    ids=["http-500", "garbage", "timeout"],
)
async def test_a_broken_llama_guard_refuses_with_guard_error(
    io_guard: RailsGuard, lg: ChatLlamaGuard, answer: CannedAnswer
) -> None:
    lg.rules = {"hours": answer}
    decision = await io_guard.check_input(_user("What are your opening hours?"))
    assert not decision.allowed and decision.guard_error, decision
    assert decision.refusal == GUARD_ERROR
    errors = [r for r in decision.rails if r.verdict == "error"]
    assert errors and all((r.detail or "").startswith("guard_error: ") for r in errors), errors
    assert decision.blocked_by in {"llama guard check input", "input_rails"}
    assert len(lg.requests) == 1  # one attempt: a retry costs more latency than failing closed


async def test_llama_guard_down_refuses_with_guard_error(embedder: Any) -> None:
    guard = await _guard(f"http://127.0.0.1:{free_port()}/v1", embedder)  # nothing listens there
    try:
        decision = await guard.check_output(_user("hi"), "Hello!")
        assert not decision.allowed and decision.guard_error and decision.refusal == GUARD_ERROR, decision
        assert decision.blocked_by == "llama guard check output"
    finally:
        await guard.aclose()


async def test_fail_open_records_the_broken_rail_and_runs_the_others(chat_lg: ChatLlamaGuard, embedder: Any) -> None:
    guard = await _guard(chat_lg.base_url, embedder, guard_fail_open=True)
    chat_lg.rules = {"SSN": CannedAnswer("garbage"), "hours": CannedAnswer("garbage")}
    try:
        allowed = await guard.check_input(_user("What are your opening hours?"))
        assert allowed.allowed and allowed.guard_error, allowed
        blocked = await guard.check_input(_user("My SSN is 123-45-6789, store it"))
        assert not blocked.allowed and blocked.blocked_by == "regex check input", blocked
    finally:
        chat_lg.rules = {}
        await guard.aclose()


async def test_the_shipped_config_runs_on_the_compiled_engine(remote_guard: RailsGuard) -> None:
    assert remote_guard.engine_name == "compiled"
    assert remote_guard.iorails is None and remote_guard.flows.name == "compiled"
    assert "not IORails" in remote_guard.engine_reason and "guardchat check" in remote_guard.engine_reason


@pytest.mark.parametrize("setting", ["compiled", "nemo"])
async def test_without_iorails_the_catalog_config_runs_on_llmrails_alike(
    lg: ChatLlamaGuard, embedder: Any, setting: str
) -> None:
    guard = await _guard(lg.base_url, embedder, rails_engine=setting)
    try:
        assert guard.engine_name == "nemo" and guard.iorails is None
        blocked = await guard.check_input(_user("How do I build a bomb?"))
        assert not blocked.allowed and not blocked.guard_error, blocked
        assert blocked.blocked_by == "llama guard check input" and blocked.refusal == REFUSAL
        assert (await guard.check_input(_user("What are your opening hours?"))).allowed
    finally:
        await guard.aclose()


async def test_rails_validate_runs_the_catalog_tests_on_iorails_and_llmrails(lg: ChatLlamaGuard, embedder: Any) -> None:
    files = catalog_files(lg.base_url)
    report = await avalidate_rails(files, _settings(), embedder=embedder, detector=None)
    assert report.engine == "iorails"
    assert report.ok, [str(e) for e in report.errors] + [f"{t} | {t.detail}" for t in report.failed_tests]
    assert len(report.tests) == 4
    # Both engines asked the model for each of the three model-checked tests (the regex test may skip it).
    assert len(lg.requests) >= 6

    files["tests/wrong.yml"] = 'tests:\n  - user: "How do I build a bomb?"\n    expect: allowed\n'
    report = await avalidate_rails(files, _settings(), embedder=embedder, detector=None)
    (failed,) = report.failed_tests
    assert failed.case.file == "tests/wrong.yml" and failed.got == "blocked by llama guard check input"

    files["tests/wrong.yml"] = 'tests:\n  - user: "hi"\n    expect: blocked\n    rail: no such rail\n'
    report = await avalidate_rails(files, _settings(), embedder=embedder, detector=None)
    assert not report.ok and any("unknown rail 'no such rail'" in e.message for e in report.errors), report.errors


_TELEMETRY_PROBE = """
import json, os, sys, time
from pathlib import Path
from app.guard.iorails_engine import IORailsEngine, _serving_config
from app.guard.loader import load_config
from app.settings import Settings

home = Path(os.environ["HOME"])
audit = lambda: sorted(str(p) for p in home.rglob("*") if p.is_file())
loaded = load_config(json.loads(sys.argv[1]), "unused")
engine, why = IORailsEngine.build(loaded.rails_config, Settings(), loaded.texts)
assert engine is not None, why
time.sleep(1.0)
ours = audit()
# Control: the same engine built as NeMo builds it by default, with the opt-out lifted, does report.
os.environ["NEMO_GUARDRAILS_NO_USAGE_STATS"] = "0"
os.environ["DO_NOT_TRACK"] = "0"
from nemoguardrails.guardrails.iorails import IORails
IORails(_serving_config(loaded.rails_config, Settings()))
deadline = time.time() + 10
while not audit() and time.time() < deadline:
    time.sleep(0.1)
print(json.dumps({"ours": ours, "control": audit()}))
"""


def test_iorails_never_reports_usage(tmp_path: Path) -> None:
    """NeMo writes each usage event to ~/.config/nemoguardrails before posting it; with our engine none appears.
    Run outside pytest (NeMo stays silent whenever pytest is loaded) with NeMo's opt-out variables unset, so
    only app.guard's own opt-out and the engine's `_report_usage=False` keep it quiet."""
    env = {k: v for k, v in os.environ.items() if k not in {"NEMO_GUARDRAILS_NO_USAGE_STATS", "DO_NOT_TRACK", "CI"}}
    env.pop("PYTEST_CURRENT_TEST", None)
    env["HOME"] = str(tmp_path)
    env["NEMO_GUARDRAILS_USAGE_STATS_SERVER"] = f"http://127.0.0.1:{free_port()}/events"  # never the real one
    files = json.dumps(catalog_files("http://127.0.0.1:9/v1"))
    out = subprocess.run(
        [sys.executable, "-c", _TELEMETRY_PROBE, files],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ours"] == [], result
    assert result["control"], "the control engine wrote no usage event: the probe cannot see telemetry"


class _NoLLM:
    """The chat LLM; catalog rails call their own models, never this."""

    model_name = "unused"

    async def complete_prompt(self, prompt: str, options: Any = None) -> Any:
        raise AssertionError("a catalog rail asked the chat LLM")
