"""Shared helpers for the benchmarks: machine description, percentiles, result files, child processes."""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"
PYTHON = sys.executable

# Every child process we start: no telemetry, no model hub.
QUIET_ENV = {
    "NEMO_GUARDRAILS_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM and the load at the time of the run (the box may be shared)."""
    cpu = platform.processor() or ""
    ids: list[str] = []  # "AMD EPYC" alone says neither Zen 1 nor Zen 4: family and model do
    simd: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                cpu = value
            elif key in ("cpu family", "model"):
                ids.append(f"{key} {value}")
            elif key == "flags":  # what decides llama.cpp's speed: AVX2, AVX-512, AMX
                simd = sorted(f for f in value.split() if f.startswith(("avx", "amx")))
                break
    except OSError:
        pass
    cpu = ", ".join([cpu, *ids])
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "cpu_simd_flags": simd,
        "ram_gib": round(mem_gib, 1),
        "loadavg_1m_when_written": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "mean": round(statistics.fmean(values), 3) if values else 0.0,
        "max": round(max(values), 3) if values else 0.0,
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A GitHub-markdown table (printed and returned, so docs can paste it as is)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = (f"\n### {title}\n" if title else "\n") + "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_result(name: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    directory = results_dir or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), "command": " ".join(sys.argv), **payload}, indent=1))
    print(f"\nresults written to {path}", flush=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """A server we started in its own process (so it does not share our GIL)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_child(
    name: str,
    args: list[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/v1/models",
    timeout: float = 300,
    log_dir: Path | None = None,
    cwd: Path | None = None,
) -> Child:
    """Starts `args` (which must listen on `port`) and waits until GET `ready_path` answers 200."""
    log_dir = log_dir or CACHE_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    child_env = {**os.environ, **QUIET_ENV, **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, cwd=cwd or PROJECT_ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    child = Child(name, proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} during startup:\n{child.log_tail()}")
        try:
            if httpx.get(child.url + ready_path, timeout=2).status_code == 200:
                return child
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    child.stop()
    raise TimeoutError(f"{name} did not become ready in {timeout:.0f}s:\n{child.log_tail()}")


def rss_mb(pid: int) -> float:
    """Resident set size of a process and all its descendants, in MiB (from /proc)."""
    total_kb = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants, in seconds (from /proc)."""
    ticks = 0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        found.append(int(child))
        found.extend(_descendants(int(child)))
    return found


def apply_quick(args: Any, parser: Any, **small: Any) -> None:
    """--quick: shrink every size the caller did not set explicitly on the command line."""
    for name, value in small.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
