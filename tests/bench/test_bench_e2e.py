"""Each benchmark script end to end at its --quick size (real processes: fake backends, guardchat,
`nemoguardrails server`, xllamacpp). Minutes on a busy 2-core box, so opt-in: BENCH_E2E=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("BENCH_E2E") != "1", reason="set BENCH_E2E=1 to run the benchmark scripts"),
]

SCRIPTS = {
    "bench.pipeline_overhead": "pipeline_overhead.json",
    "bench.streaming_ttft": "streaming_ttft.json",
    "bench.faiss_bench": "faiss.json",
    "bench.embedded_model": "embedded_model.json",
    "bench.memory": "memory.json",
}


@pytest.mark.parametrize("module", sorted(SCRIPTS))
def test_benchmark_runs_end_to_end(module: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--quick", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / SCRIPTS[module]).read_text())
    assert result["machine"]["nproc"] >= 1
    assert "|" in done.stdout  # printed its table
