"""Safety and topic evals on the real guard (shipped rails, MiniLM detector, SmolLM2 judge), in-process
and through a running server's /v1/checks; the report numbers are checked against the guard's own
per-row decisions, and the files (JSON, Markdown, PNG) against the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from app.eval import eval_guard
from app.eval.cli import eval_app
from app.eval.data import TOPIC_DATA, load_rows
from app.eval.runner import in_process_guard, run_guard_eval
from app.settings import Settings
from tests.eval.conftest import TINY_SAFETY_ROWS
from tests.fixtures.server import LiveServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_report_files(out: Path, prefix: str, report: dict[str, Any]) -> None:
    stored = json.loads((out / f"{prefix}.json").read_text())
    assert stored["overall"] == report["overall"]
    assert stored["confusion"] == report["confusion"]
    markdown = (out / f"{prefix}.md").read_text()
    assert "false-refusal rate" in markdown and "Confusion matrix" in markdown
    for chart in ("confusion", "latency", "categories", "rails"):
        png = out / f"{prefix}_{chart}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, chart
        assert f"{prefix}_{chart}.png" in markdown


def check_arithmetic(report: dict[str, Any]) -> None:
    o = report["overall"]
    (tp, fn), (fp, tn) = report["confusion"]["matrix"]
    assert tp + fn == o["should_block"] and fp + tn == o["should_allow"]
    assert o["block_rate"] == round(tp / o["should_block"], 4)
    assert o["false_refusal_rate"] == round(fp / o["should_allow"], 4)
    assert len(report["misses"]) == fn and len(report["false_refusals"]) == fp
    assert sum(g["n"] for g in report["by_category"].values()) == report["rows"] - report["errors"]
    assert sum(r["decided_blocks"] for r in report["by_rail"].values()) == tp + fp
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]


async def test_eval_guard_matches_the_guards_own_decisions(base_settings: Settings) -> None:
    rows = load_rows([TOPIC_DATA])[::6]  # a spread of on-domain and off-topic rows
    raw = [{"text": r.text, "label": r.label, "category": r.category} for r in rows]
    async with in_process_guard(base_settings) as (guard, embedder):
        report = await eval_guard(guard, embedder, raw, kind="topic")
        decisions = []
        for row in rows:
            vec = embedder.embed([row.text])[0]
            decisions.append((row, await guard.check_input([{"role": "user", "content": row.text}], vec)))
    should_block = [d for r, d in decisions if r.expected == "block"]
    should_allow = [d for r, d in decisions if r.expected == "allow"]
    assert report["overall"]["blocked"] == sum(not d.allowed for d in should_block)
    assert report["overall"]["refused"] == sum(not d.allowed for d in should_allow)
    assert report["rows"] == len(rows)
    check_arithmetic(report)
    # Why the two always agree now: the default guard asks no LLM judge, whose timeouts under load once made the
    # eval and the direct check disagree (issue 17's CI flake on a slow machine).
    assert not any("judge" in (r.detail or "") for _, d in decisions for r in d.rails)


def test_safety_eval_in_process_and_via_server_agree(
    base_settings: Settings, eval_server: LiveServer, tiny_safety_file: Path, tmp_path: Path
) -> None:
    local = run_guard_eval("safety", [tiny_safety_file], base_settings, server=None, out_dir=tmp_path / "local")
    remote = run_guard_eval(
        "safety", [tiny_safety_file], base_settings, server=eval_server.url, out_dir=tmp_path / "remote"
    )
    for report, out in ((local, tmp_path / "local"), (remote, tmp_path / "remote")):
        assert report["rows"] == len(TINY_SAFETY_ROWS) - 1  # the unknown label is skipped
        assert report["errors"] == 0
        check_arithmetic(report)
        assert_report_files(out, "safety", report)
        assert report["markdown"].startswith("# Safety eval")
        # The jailbreak template was filled with one of the run's harmful requests.
        assert "jailbreak" in report["by_label"] and "jailbreak_template" not in report["by_label"]
        # Unambiguous rows: plainly harmful requests blocked, plain bank questions allowed.
        assert report["by_label"]["harmful"]["block_rate"] == 1.0
        assert report["by_label"]["benign"]["false_refusal_rate"] == 0.0
    assert local["confusion"] == remote["confusion"]
    assert local["by_label"] == remote["by_label"]
    assert remote["target"] == eval_server.url


def test_cli_topic_eval_against_a_server(eval_server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "topic"
    result = CliRunner().invoke(eval_app, ["topic", "--server", eval_server.url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "topic.json").read_text())
    rows = load_rows([TOPIC_DATA])
    assert len(rows) >= 100 and report["rows"] == len(rows)
    assert {"investment_advice", "legal_advice", "tax_advice", "off_topic", "on_domain"} <= set(report["by_category"])
    check_arithmetic(report)
    assert_report_files(out, "topic", report)
    assert "# Topic eval" in result.output


def test_server_errors_are_reported_not_counted(tiny_safety_file: Path, tmp_path: Path) -> None:
    from tests.fixtures.server import free_port

    report = run_guard_eval("safety", [tiny_safety_file], Settings(), server=f"http://127.0.0.1:{free_port()}",
                            out_dir=tmp_path)
    assert report["errors"] == report["rows"] == len(TINY_SAFETY_ROWS) - 1
    assert report["overall"]["should_block"] == 0 and report["overall"]["block_rate"] is None
    assert (tmp_path / "safety.md").exists()
