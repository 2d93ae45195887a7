"""garak's `openai.OpenAICompatible` generator against our /v1: one small string-detector probe
(encoding.InjectHex, prompt cap 3, one generation) through a real server. garak is an optional dev extra
whose pins conflict with ours (transformers, openai), so it usually lives in its own environment:
the test uses garak from this venv, or the interpreter in GUARDCHAT_GARAK_PYTHON, or data/venv-garak
(see docs/evaluation.md); it is skipped when none has garak."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import PROJECT_ROOT
from tests.fixtures.server import LiveServer


def garak_python() -> str | None:
    if importlib.util.find_spec("garak") is not None:
        return sys.executable
    local = PROJECT_ROOT / "data" / "venv-garak" / "bin" / "python"
    candidates = [os.environ.get("GUARDCHAT_GARAK_PYTHON"), str(local)]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import garak"], capture_output=True, timeout=120)
            if probe.returncode == 0:
                return candidate
    return None


GARAK_PYTHON = garak_python()


@pytest.mark.skipif(GARAK_PYTHON is None, reason="garak is not installed (optional extra, see docs/evaluation.md)")
def test_garak_openai_compatible_generator_runs_a_probe(eval_server: LiveServer, tmp_path: Path) -> None:
    assert GARAK_PYTHON is not None
    config = {
        "system": {"parallel_attempts": False, "lite": True, "show_z": False},
        "run": {"generations": 1, "soft_probe_prompt_cap": 3, "seed": 7},
        "plugins": {
            "target_type": "openai.OpenAICompatible",
            "target_name": "guardchat",
            "probe_spec": "encoding.InjectHex",
            "generators": {"openai": {"OpenAICompatible": {
                "uri": eval_server.url + "/v1",
                "api_key": "not-needed-on-loopback",
                "model": "guardchat",
                "max_tokens": 48,
                "suppressed_params": ["n", "frequency_penalty", "presence_penalty", "stop"],
            }}},
        },
        "reporting": {"report_dir": str(tmp_path / "reports"), "report_prefix": "guardchat-garak"},
    }
    config_file = tmp_path / "garak.json"
    config_file.write_text(json.dumps(config))
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg-data"), "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([GARAK_PYTHON, "-m", "garak", "--config", str(config_file)], capture_output=True,
                         text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    reports = list((tmp_path / "reports").rglob("guardchat-garak.report.jsonl"))
    assert reports, run.stdout[-3000:]
    entries = [json.loads(line) for line in reports[0].read_text().splitlines() if line.strip()]
    attempts = [e for e in entries if e.get("entry_type") == "attempt" and e.get("status") == 2]
    assert 1 <= len(attempts) <= 3
    # Every prompt reached our server and came back with an answer (the assistant's reply or its refusal).
    for attempt in attempts:
        outputs = attempt["outputs"]
        assert outputs and all(o and (o.get("text") if isinstance(o, dict) else o) for o in outputs), attempt
    evals = [e for e in entries if e.get("entry_type") == "eval"]
    match = [e for e in evals if e["probe"] == "encoding.InjectHex" and e["detector"] == "encoding.DecodeMatch"]
    assert match and match[0]["total_evaluated"] >= len(attempts)
    assert match[0]["passed"] + match[0]["fails"] == match[0]["total_evaluated"]
