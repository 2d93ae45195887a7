"""Starts the processes of a benchmark run: the fake backends, guardchat, and `nemoguardrails server`."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import fake_backends
from bench.common import PYTHON, Child, free_port, start_child
from bench.loadgen import LoadResult

NEMO_CONFIG = Path(__file__).resolve().parent / "nemo_configs" / "four_rails"
NEMO_CONFIG_ID = NEMO_CONFIG.name


@dataclass
class Backends:
    llm: Child
    guard: Child

    def stop(self) -> None:
        self.llm.stop()
        self.guard.stop()


def start_backends(ttft_ms: float = 0.0, itl_ms: float = 0.0, repeat: int = 1, grounded: bool = False) -> Backends:
    """The chat LLM (with the given latency) and an instant Llama Guard, each in its own process."""
    llm_port, guard_port = free_port(), free_port()
    llm = start_child("fake-llm", fake_backends.command(llm_port, ttft_ms, itl_ms, repeat, grounded), llm_port)
    try:
        guard = start_child("fake-guard", fake_backends.command(guard_port), guard_port)
    except BaseException:
        llm.stop()
        raise
    return Backends(llm, guard)


def guardchat_env(backends: Backends, corpus: dict[str, Any], redis_url: str | None, **extra: str) -> dict[str, str]:
    env = {
        "GUARDCHAT_LLM_BACKEND": "openai",
        "GUARDCHAT_LLM_URL": backends.llm.url + "/v1",
        "GUARDCHAT_LLM_MODEL": "fake-llm",
        "GUARDCHAT_GUARD_BACKEND": "openai",
        "GUARDCHAT_GUARD_URL": backends.guard.url + "/v1",
        "GUARDCHAT_GUARD_MODEL": "llama-guard",
        "GUARDCHAT_DATA_DIR": corpus["data_dir"],
        "GUARDCHAT_KNOWLEDGE_DIR": corpus["knowledge_dir"],
        "GUARDCHAT_UI_ENABLED": "false",
        "GUARDCHAT_LOG_LEVEL": "warning",
        # Each run gets its own keys, so sessions and rails versions of other runs never interfere.
        "GUARDCHAT_REDIS_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:8]}:",
    }
    if redis_url:
        env["GUARDCHAT_REDIS_URL"] = redis_url
    return {**env, **extra}


def start_guardchat(
    env: dict[str, str], *, loop: str = "auto", http: str = "auto", workers: int = 1
) -> Child:
    port = free_port()
    args = [PYTHON, "-m", "bench.serve", "--port", str(port), "--loop", loop, "--http", http, "--workers", str(workers)]
    return start_child("guardchat", args, port, env=env, ready_path="/healthz", timeout=600)


def start_nemo(backends: Backends, *, iorails: bool) -> tuple[Child, Path]:
    """`nemoguardrails server` over a copy of bench/nemo_configs/four_rails pointed at the fake backends."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-nemo-"))
    config_dir = workdir / NEMO_CONFIG_ID
    shutil.copytree(NEMO_CONFIG, config_dir)
    config = (config_dir / "config.yml").read_text()
    config = config.replace("http://127.0.0.1:8101", backends.llm.url)
    config = config.replace("http://127.0.0.1:8102", backends.guard.url)
    (config_dir / "config.yml").write_text(config)
    port = free_port()
    exe = str(Path(PYTHON).parent / "nemoguardrails")
    env = {"OPENAI_API_KEY": "bench"}
    if iorails:
        env["NEMO_GUARDRAILS_IORAILS_ENGINE"] = "1"
    args = [exe, "server", "--config", str(config_dir), "--port", str(port), "--disable-chat-ui"]
    child = start_child("nemo-iorails" if iorails else "nemo-llmrails", args, port, env=env,
                        ready_path="/v1/rails/configs", timeout=600)
    return child, workdir


def run_loadgen(
    url: str,
    kind: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    config_id: str | None = None,
    cpu_pid: int | None = None,
) -> LoadResult:
    """The load generator in its own process (its CPU is not the server's GIL)."""
    args = [PYTHON, "-m", "bench.loadgen", "--url", url, "--kind", kind, "--concurrency", str(concurrency),
            "--duration", str(duration_s), "--warmup", str(warmup_s)]
    if config_id:
        args += ["--config-id", config_id]
    if cpu_pid is not None:  # the server's CPU time per turn: steadier than latency on a shared box
        args += ["--cpu-pid", str(cpu_pid)]
    done = subprocess.run(args, capture_output=True, timeout=duration_s + warmup_s + 600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return LoadResult.from_dict(json.loads(done.stdout))
