"""The start-up speed probe (app/llm/speed.py) against the real embedded llama.cpp server (SmolLM2-135M)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.llm.embedded import EmbeddedLLMServer
from app.llm.speed import (
    WARM_PAGE_PROMPT_TOKENS,
    LLMSpeed,
    SpeedProbe,
    grounded_prompt_tokens,
    measure_speed,
    probe_and_report,
    report_speed,
    start_speed_probe,
)
from app.settings import Settings
from tests.fixtures.llm import TEST_MODEL
from tests.fixtures.server import free_port

SPEED_LOGGER = "app.llm.speed"


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]  # pydantic-settings init kwarg


def test_measures_positive_speeds_and_the_prompt_is_never_served_from_the_cache(embedded_llm_url: str) -> None:
    first = measure_speed(embedded_llm_url)
    again = measure_speed(embedded_llm_url)
    assert first.prompt_tps > 0 and first.decode_tps > 0
    # The whole ~200-token prompt was read both times: a KV-cache hit would leave prompt_n at a token or two.
    assert first.prompt_tokens >= 150
    assert abs(again.prompt_tokens - first.prompt_tokens) <= 2  # only the unique first line may differ


def test_ttft_estimate_arithmetic(embedded_llm_url: str) -> None:
    speed = measure_speed(embedded_llm_url)
    assert speed.ttft_s(850) == pytest.approx(850 / speed.prompt_tps + 1 / speed.decode_tps)
    assert LLMSpeed(prompt_tps=17.0, decode_tps=5.0, prompt_tokens=200).ttft_s(850) == pytest.approx(50.2)
    # Whole chunks: 270 (system prompt, rules, question) + min(900 budget, 3 chunks x 900 chars / 4) = 270 + 675.
    assert grounded_prompt_tokens(settings(rag_context_mode="chunks")) == 945
    assert grounded_prompt_tokens(settings(rag_context_mode="chunks", rag_context_tokens=400)) == 670  # budget binds
    # Passages (the default): about twice the 120-token minimum budget.
    assert grounded_prompt_tokens(settings()) == 270 + 240
    assert grounded_prompt_tokens(settings(rag_context_tokens=200)) == 270 + 200


def test_slow_estimate_warns_with_the_faster_model_setting(
    embedded_llm_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=SPEED_LOGGER)
    speed = probe_and_report(
        SpeedProbe(embedded_llm_url), model_name="qwen2.5-1.5b", prompt_tokens=945, threshold_s=0.0
    )
    assert speed is not None
    info = [r for r in caplog.records if r.levelno == logging.INFO and r.name == SPEED_LOGGER]
    assert len(info) == 1 and "tokens/s" in info[0].getMessage()
    assert info[0].ttft_estimate_s == round(speed.ttft_s(945), 1)  # type: ignore[attr-defined]  # log extra
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "GUARDCHAT_EMBEDDED_MODEL=qwen2.5-0.5b" in warnings[0]


def test_fast_estimate_only_informs(embedded_llm_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SPEED_LOGGER)
    probe = SpeedProbe(embedded_llm_url)
    assert probe_and_report(probe, model_name="qwen2.5-1.5b", prompt_tokens=945, threshold_s=1e9)
    assert [r.levelno for r in caplog.records if r.name == SPEED_LOGGER] == [logging.INFO]


def test_no_faster_model_to_suggest_for_the_small_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SPEED_LOGGER)
    report_speed(LLMSpeed(30.0, 8.0, 200), model_name="qwen2.5-0.5b", prompt_tokens=945, threshold_s=15.0)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "GUARDCHAT_EMBEDDED_MODEL" not in warning and "GUARDCHAT_RAG_CONTEXT_TOKENS" in warning


def test_unreachable_server_logs_and_moves_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SPEED_LOGGER)
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    assert probe_and_report(SpeedProbe(dead, timeout_s=5), model_name="qwen2.5-1.5b", prompt_tokens=945) is None
    assert any("could not measure" in r.getMessage() for r in caplog.records)


def test_start_speed_probe_keeps_the_result_on_the_server(embedded_llm_server: EmbeddedLLMServer) -> None:
    assert start_speed_probe(None, settings()) is None  # remote backends: nothing to probe
    thread = start_speed_probe(embedded_llm_server, settings())
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert embedded_llm_server.speed is not None and embedded_llm_server.speed.prompt_tps > 0


def test_closing_the_server_mid_probe_does_not_hang(embedded_model_path: Path) -> None:
    # llama.cpp's teardown waits, holding the GIL, for the clients of open requests: without the close hook that
    # cuts the probe's connection, close() would never return.
    server = EmbeddedLLMServer(embedded_model_path, model_name=TEST_MODEL, ctx_size=1024, threads=1, parallel=1)
    server.start()
    thread = start_speed_probe(server, settings())
    assert thread is not None
    deadline = time.monotonic() + 30
    while not any(slot.get("is_processing") for slot in httpx.get(server.root_url + "/slots", timeout=5).json()):
        assert time.monotonic() < deadline, "the probe never reached the server"
        time.sleep(0.02)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 10
    thread.join(timeout=5)
    assert not thread.is_alive() and server.speed is None


def test_with_answer_pages_both_times_are_said(caplog: pytest.LogCaptureFixture) -> None:
    """A question whose answer page is cached reads only itself: on a slow CPU ~18 s before, ~1.5 s after."""
    caplog.set_level(logging.INFO, logger=SPEED_LOGGER)
    speed = LLMSpeed(prompt_tps=29.0, decode_tps=8.3, prompt_tokens=200)
    report_speed(speed, model_name="qwen2.5-1.5b", prompt_tokens=510, threshold_s=15.0,
                 warm_prompt_tokens=WARM_PAGE_PROMPT_TOKENS)  # fmt: skip
    (info,) = [r for r in caplog.records if r.levelno == logging.INFO]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "~17.7 s" in info.getMessage() and "~1.5 s once its answer page is read" in info.getMessage()
    assert info.ttft_estimate_warm_page_s == 1.5  # type: ignore[attr-defined]  # log extra
    assert "~18 s to start" in warning and "until its answer page is read" in warning and "~1.5 s after that" in warning
    assert "GUARDCHAT_EMBEDDED_MODEL=qwen2.5-0.5b" in warning
