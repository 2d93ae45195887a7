"""`validate_rails`: check a rails config (directory or draft files) and run its own test conversations.

Test files are rails/tests/*.yml:

    tests:
      - name: investment advice is refused      # optional
        user: "Should I buy Tesla stock?"
        history:                                 # optional earlier turns
          - {role: user, content: "Hi"}
          - {role: assistant, content: "Hello! How can I help?"}
        answer: "..."                            # optional: check the output rails on this answer instead
        context: ["..."]                         # optional retrieved text, for the groundedness rail
        expect: blocked                          # allowed | blocked
        rail: topic                              # with blocked: the rail that must block (a name or a list:
                                                 # ours, or a NeMo catalog flow the config runs)

Every test runs on the engine the server picks for the config (app/guard/rails.py: IORails for a config of
NeMo catalog rails only, else the compiled flows, else LLMRails) and, when that is not LLMRails, on NeMo's
LLMRails too; a test whose two outcomes differ fails: the server must do what NeMo's reading of the config says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import yaml

from app.guard.loader import TESTS_DIR, ConfigProblem, RailsConfigError, read_rails_files, yaml_line
from app.llm.base import ChatBackend, Completion, GenerationOptions, LLMUnavailable
from app.rag.base import Embedder
from app.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from app.guard.base import Classifier, GuardDecision
    from app.guard.rails import RailsGuard

log = logging.getLogger(__name__)
RAIL_NAMES = ("safety_input", "attack", "topic", "safety_output", "groundedness")
_BUILTIN_ACTIONS = {"utter"}


# A validation error is a config problem: (file, line, message), printed as `file:line: message`.
ValidationError = ConfigProblem


@dataclass
class RailsTestCase:
    file: str
    line: int | None
    name: str
    user: str
    expect: Literal["allowed", "blocked"]
    rails: list[str]
    history: list[dict[str, str]] = field(default_factory=list)
    answer: str | None = None
    context: list[str] | None = None


@dataclass
class RailsTestResult:
    case: RailsTestCase
    passed: bool
    got: str  # "allowed" | "blocked by <rail>"
    detail: str = ""

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        want = self.case.expect + (f" by {'/'.join(self.case.rails)}" if self.case.rails else "")
        return f"{self.case.file}:{self.case.line}: {status} {self.case.name}: expected {want}, got {self.got}"


@dataclass
class ValidationReport:
    errors: list[ValidationError] = field(default_factory=list)
    tests: list[RailsTestResult] = field(default_factory=list)
    engine: str | None = None  # the engine the server would run the config on, and why
    engine_reason: str | None = None

    @property
    def failed_tests(self) -> list[RailsTestResult]:
        return [t for t in self.tests if not t.passed]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed_tests


class _NoJudge:
    """Stands in when no LLM was given: any judge call is a guard error, reported by the tests."""

    model_name = "none"

    async def complete_prompt(self, prompt: str, options: GenerationOptions | None = None) -> Completion:
        raise LLMUnavailable("no LLM backend was given to validate_rails for the safety judge")


def parse_tests(
    files: dict[str, str], errors: list[ValidationError], rail_names: Collection[str] | None = RAIL_NAMES
) -> list[RailsTestCase]:
    """`rail_names` are the rails a test may name (None: any; check them with `unknown_test_rails`)."""
    cases: list[RailsTestCase] = []
    for name, text in sorted(files.items()):
        if not (name.startswith(TESTS_DIR + "/") and name.endswith((".yml", ".yaml"))):
            continue
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            errors.append(ValidationError(name, mark.line + 1 if mark else None, f"invalid YAML: {exc}"))
            continue
        items = data.get("tests") if isinstance(data, dict) else None
        if not isinstance(items, list):
            errors.append(ValidationError(name, 1, "a rails test file needs a top-level `tests:` list"))
            continue
        for i, item in enumerate(items):
            line = yaml_line(text, ("tests", i))
            problem = _test_problem(item, rail_names)
            if problem:
                errors.append(ValidationError(name, line, problem))
                continue
            rails = item.get("rail") or []
            cases.append(
                RailsTestCase(
                    file=name,
                    line=line,
                    name=str(item.get("name") or item["user"][:60]),
                    user=str(item["user"]),
                    expect=item["expect"],
                    rails=[rails] if isinstance(rails, str) else list(rails),
                    history=list(item.get("history") or []),
                    answer=item.get("answer"),
                    context=item.get("context"),
                )
            )
    return cases


def _test_problem(item: Any, rail_names: Collection[str] | None) -> str | None:
    if not isinstance(item, dict):
        return "each test must be a mapping"
    unknown = set(item) - {"name", "user", "history", "answer", "context", "expect", "rail"}
    if unknown:
        return f"unknown test keys {sorted(unknown)}"
    if not isinstance(item.get("user"), str) or not item["user"].strip():
        return "a test needs a non-empty `user` message"
    if item.get("expect") not in ("allowed", "blocked"):
        return "`expect` must be `allowed` or `blocked`"
    rails = item.get("rail") or []
    for rail in [rails] if isinstance(rails, str) else rails:
        if rail_names is not None and rail not in rail_names:
            return f"unknown rail {rail!r}; rails are {', '.join(rail_names)}"
    history = item.get("history") or []
    if not isinstance(history, list) or any(
        not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str)
        for m in history
    ):
        return "`history` must be a list of {role: user|assistant, content: text}"
    return None


async def _decide(guard: RailsGuard, case: RailsTestCase, embedding: np.ndarray | None) -> GuardDecision:
    messages = [*case.history, {"role": "user", "content": case.user}]
    if case.answer is not None:
        return await guard.check_output(messages, case.answer, case.context)
    return await guard.check_input(messages, embedding)


def unknown_test_rails(cases: list[RailsTestCase], guard: RailsGuard) -> list[ValidationError]:
    """Tests naming a rail that is neither ours nor a flow of the config."""
    from app.guard.iorails_engine import flow_name

    flows = guard.loaded.rails_config.rails
    known = [*RAIL_NAMES, *(flow_name(f) for f in [*flows.input.flows, *flows.output.flows])]
    return [
        ValidationError(case.file, case.line, f"unknown rail {rail!r}; rails are {', '.join(dict.fromkeys(known))}")
        for case in cases
        for rail in case.rails
        if rail not in known
    ]


def _outcome(decision: GuardDecision) -> str:
    return "allowed" if decision.allowed else f"blocked by {decision.blocked_by}"


async def run_case(guard: RailsGuard, embedder: Embedder, case: RailsTestCase) -> RailsTestResult:
    """Runs the case on the engine the server uses and, when that is IORails or the compiled engine, on NeMo's
    LLMRails too: the two must agree, or the server would not do what NeMo's reading of the config says."""
    embedding = None if case.answer is not None else (await asyncio.to_thread(embedder.embed, [case.user]))[0]
    decision = await _decide(guard, case, embedding)
    got = _outcome(decision)
    detail = "; ".join(f"{r.name}={r.verdict}" + (f" ({r.detail})" if r.detail else "") for r in decision.rails)
    if case.expect == "allowed":
        passed = decision.allowed
    else:
        passed = not decision.allowed and not decision.guard_error
        if passed and case.rails:
            blocking = {decision.blocked_by} | {r.name for r in decision.rails if r.verdict == "block"}
            passed = bool(blocking & set(case.rails))
    engine = guard.engine_name
    if engine != "nemo":
        on_nemo = _outcome(await _decide(guard.on_llmrails(), case, embedding))
        if on_nemo != got:
            passed = False
            got = f"{got} ({engine} engine) but {on_nemo} on NeMo LLMRails"
    return RailsTestResult(case, passed, got, detail)


def validate_rails(
    files: dict[str, str] | Path,
    settings: Settings,
    *,
    run_tests: bool = True,
    llm: ChatBackend | None = None,
    embedder: Embedder | None = None,
    detector: Classifier | None | Literal["auto"] = "auto",
) -> ValidationReport:
    """Synchronous entry point (the CLI). From async code use `avalidate_rails`: the LLM client
    belongs to the caller's event loop."""
    coro = avalidate_rails(files, settings, run_tests=run_tests, llm=llm, embedder=embedder, detector=detector)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("validate_rails called inside an event loop; await avalidate_rails(...) instead")


async def avalidate_rails(
    files: dict[str, str] | Path,
    settings: Settings,
    *,
    run_tests: bool = True,
    llm: ChatBackend | None = None,
    embedder: Embedder | None = None,
    detector: Classifier | None | Literal["auto"] = "auto",
) -> ValidationReport:
    """`detector="auto"` loads the committed detector weights when present, as the server does."""
    from app.guard.rails import build_guard

    report = ValidationReport()
    try:
        contents = read_rails_files(files)
    except RailsConfigError as exc:
        report.errors += [ValidationError(p.file, p.line, p.message) for p in exc.problems]
        return report
    cases = parse_tests(contents, report.errors, rail_names=None)  # checked once the config's flows are known
    if embedder is None:
        from app.rag.embedder import get_embedder

        embedder = await asyncio.to_thread(get_embedder)
    if detector == "auto":
        detector = _load_detector(settings)
    try:
        guard = await asyncio.to_thread(
            build_guard,
            contents,
            settings,
            llm=llm or cast(ChatBackend, _NoJudge()),
            embedder=embedder,
            detector=detector,
        )
    except RailsConfigError as exc:
        report.errors += [ValidationError(p.file, p.line, p.message) for p in exc.problems]
        return report
    except Exception as exc:  # NeMo's own validation (unknown flows, ...) has no line numbers
        report.errors.append(ValidationError(None, None, f"NeMo could not load the config: {exc}"))
        return report
    report.engine, report.engine_reason = guard.engine_name, guard.engine_reason
    try:
        report.errors += _unknown_actions(guard) + unknown_test_rails(cases, guard)
        if run_tests and not report.errors:
            report.tests = [await run_case(guard, embedder, case) for case in cases]
    finally:
        await guard.aclose()
    return report


def _unknown_actions(guard: RailsGuard) -> list[ValidationError]:
    dispatcher = guard.engine.runtime.action_dispatcher
    errors = []
    for flow in guard.loaded.rails_config.flows:
        for element in flow.get("elements", []):
            name = element.get("action_name") if element.get("_type") == "run_action" else None
            if name and name not in _BUILTIN_ACTIONS and not dispatcher.has_registered(name):
                src = element.get("_source_mapping") or {}
                errors.append(ValidationError(src.get("filename"), src.get("line_number"), f"unknown action `{name}`"))
    return errors


def _load_detector(settings: Settings) -> Classifier | None:
    try:
        from app.guard.detector import load_classifier

        return load_classifier(settings.guard_classifier, threads=settings.guard_threads)
    except Exception as exc:  # no weights committed yet: the judge decides safety alone
        log.warning("no detector weights (%s); validating without stage 1", exc)
        return None


def validate_rails_cli(directory: Path, settings: Settings, *, run_tests: bool = True) -> int:
    """`guardchat rails validate [DIR]`: prints `file:line: message` per problem and one line per test;
    returns the exit code (0 = valid and every test passed)."""
    llm: Any = None
    server: Any = None
    if run_tests and settings.guard_backend == "embedded":
        # The stage-2 judge is the chat LLM; start it (embedded llama.cpp) only when tests need it.
        from app.llm.factory import build_chat_backend

        llm, server = build_chat_backend(settings)

    async def run() -> ValidationReport:
        try:
            return await avalidate_rails(directory, settings, run_tests=run_tests, llm=llm)
        finally:
            if llm is not None:
                await llm.aclose()

    try:
        report = asyncio.run(run())
    finally:
        if server is not None:
            server.close()
    if report.engine:
        print(f"engine: {report.engine} ({report.engine_reason})")
    for error in report.errors:
        print(error)
    for test in report.tests:
        print(test if test.passed else f"{test}\n    {test.detail}")
    passed = len(report.tests) - len(report.failed_tests)
    print(f"{len(report.errors)} error(s); {passed}/{len(report.tests)} rails test(s) passed")
    return 0 if report.ok else 1
