"""validate_rails: the shipped config passes its own tests; broken drafts are reported as file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.guard.validate import avalidate_rails, validate_rails
from app.settings import Settings
from tests.guard.conftest import RAILS_DIR


def _shipped() -> dict[str, str]:
    return {p.relative_to(RAILS_DIR).as_posix(): p.read_text() for p in RAILS_DIR.rglob("*") if p.is_file()}


async def _validate(files, embedder, detector, llm=None, run_tests=False):
    return await avalidate_rails(
        files, Settings(guard_timeout_s=60), run_tests=run_tests, llm=llm, embedder=embedder, detector=detector
    )


async def test_shipped_config_passes_all_its_tests(embedder, detector, embedded_judge) -> None:
    report = await _validate(RAILS_DIR, embedder, detector, llm=embedded_judge, run_tests=True)
    assert report.errors == []
    assert len(report.tests) >= 40
    failures = "\n".join(f"{t} | {t.detail}" for t in report.failed_tests)
    assert report.ok, failures
    tested_rails = {rail for t in report.tests for rail in t.case.rails}
    assert {"safety_input", "attack", "topic"} <= tested_rails
    assert any(t.case.expect == "allowed" for t in report.tests)


async def test_a_test_that_expects_the_wrong_thing_fails(embedder, detector, embedded_judge) -> None:
    files = _shipped()
    files["tests/extra.yml"] = 'tests:\n  - user: "Should I buy Tesla stock?"\n    expect: allowed\n'
    report = await _validate(files, embedder, detector, llm=embedded_judge, run_tests=True)
    failed = [t for t in report.failed_tests if t.case.file == "tests/extra.yml"]
    assert (
        len(failed) == 1
        and failed[0].got == "blocked by topic"
        and str(failed[0]).startswith("tests/extra.yml:2: FAIL")
    )


async def test_broken_yaml_is_reported_with_its_line(embedder, detector) -> None:
    files = _shipped()
    files["config.yml"] = files["config.yml"].replace("  output:\n", "  output: oops: [1]\n", 1)
    report = await _validate(files, embedder, detector)
    assert not report.ok
    lines = files["config.yml"].splitlines()
    bad_line = next(i for i, line in enumerate(lines, 1) if "oops" in line)
    (error,) = [e for e in report.errors if e.file == "config.yml"]
    assert error.line == bad_line and "invalid YAML" in error.message, error


async def test_broken_colang_is_reported_with_its_line(embedder, detector) -> None:
    files = _shipped()
    files["rails.co"] += "\ndefine flow broken\n  if\n"
    report = await _validate(files, embedder, detector)
    (error,) = report.errors
    assert error.file == "rails.co" and error.line == len(files["rails.co"].splitlines())
    assert str(error).startswith(f"rails.co:{error.line}: ")


async def test_semantic_errors_point_at_the_key(embedder, detector) -> None:
    files = _shipped()
    files["config.yml"] = files["config.yml"].replace(
        "    S14: {name: Code Interpreter Abuse}", "    X14: {name: Oops}"
    )
    files["config.yml"] = files["config.yml"].replace("  thresholds:\n", "  thresholds:\n    unsafe_blok: 0.5\n")
    report = await _validate(files, embedder, detector)
    lines = files["config.yml"].splitlines()
    by_message = {e.message.split(":")[0]: e for e in report.errors}
    assert by_message["guardchat.llama_guard_categories"].line == next(
        i for i, line in enumerate(lines, 1) if "llama_guard_categories:" in line
    )
    # The mapping that holds the bad key (block style) or the key's own line (flow style).
    bad_key_line = next(i for i, line in enumerate(lines, 1) if "unsafe_blok" in line)
    assert by_message["guardchat.thresholds"].line in (bad_key_line - 1, bad_key_line)
    assert lines[by_message["guardchat.thresholds"].line - 1].strip().startswith(("thresholds:", "unsafe_blok"))


async def test_references_and_unknown_actions_are_reported(embedder, detector) -> None:
    files = _shipped()
    files["config.yml"] = files["config.yml"].replace(
        "blocked_intents: [ask investment advice,", "blocked_intents: [ask crypto advice, ask investment advice,"
    )
    report = await _validate(files, embedder, detector)
    assert any("`ask crypto advice`, which has no `define user` examples" in e.message for e in report.errors)

    files = _shipped()
    files["rails.co"] = files["rails.co"].replace("execute guardchat_check_attack", "execute guardchat_check_atack")
    report = await _validate(files, embedder, detector)
    (error,) = report.errors
    line = next(i for i, t in enumerate(files["rails.co"].splitlines(), 1) if "guardchat_check_atack" in t)
    assert (error.file, error.line) == ("rails.co", line) and "unknown action `guardchat_check_atack`" in error.message


async def test_bad_test_files_and_python_files_are_rejected(embedder, detector) -> None:
    files = _shipped()
    files["tests/bad.yml"] = "tests:\n  - user: hi\n    expect: allowed\n  - user: hello\n    expect: maybe\n"
    files["config.py"] = "import os\n"
    report = await _validate(files, embedder, detector)
    messages = {str(e) for e in report.errors}
    assert "tests/bad.yml:4: `expect` must be `allowed` or `blocked`" in messages
    assert "config.py: python files are not allowed in a rails config" in messages


def test_sync_entry_point_reports_a_missing_directory(tmp_path: Path) -> None:
    report = validate_rails(tmp_path / "nope", Settings(), run_tests=False)
    assert not report.ok and "does not exist" in report.errors[0].message


async def test_sync_entry_point_refuses_to_run_inside_a_loop() -> None:
    with pytest.raises(RuntimeError, match="avalidate_rails"):
        validate_rails(RAILS_DIR, Settings(), run_tests=False)


async def test_a_test_fails_when_the_compiled_engine_and_nemo_disagree(embedder, detector, embedded_judge) -> None:
    """The server runs the compiled engine; validation also asks NeMo's LLMRails and fails a test when they differ.
    Here the guard's compiled program is swapped for one that blocks every input, so only NeMo allows."""
    from nemoguardrails import RailsConfig

    from app.guard.compiled import compile_rails
    from app.guard.rails import build_guard
    from app.guard.validate import RailsTestCase, run_case

    settings = Settings(guard_timeout_s=60)
    guard = build_guard(_shipped(), settings, llm=embedded_judge, embedder=embedder, detector=detector)
    try:
        assert guard.engine_name == "compiled"
        colang = 'define bot no\n  "No."\n\ndefine flow always block\n  $v = execute deny\n  bot no\n  stop\n'
        yaml = "rails:\n  input:\n    flows:\n      - always block\n"

        async def deny() -> str:
            return "block"

        config = RailsConfig.from_content(colang_content=colang, yaml_content=yaml)
        blocking, why_not = compile_rails(config, {"deny": deny})
        assert blocking is not None, why_not
        case = RailsTestCase("tests/x.yml", 1, "card question", "How do I freeze my debit card?", "allowed", [])
        agreed = await run_case(guard, embedder, case)
        assert agreed.passed and agreed.got == "allowed", agreed.detail
        guard.flows = blocking
        result = await run_case(guard, embedder, case)
        assert not result.passed
        assert "on NeMo LLMRails" in result.got and result.got.startswith("blocked"), result.got
        assert guard.flows is blocking  # the NeMo run was on a twin: the guard's own engine is untouched
    finally:
        await guard.aclose()
