"""`guardchat eval safety` entry point kept for the CLI: a thin wrapper over app.eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_safety_eval(
    data: list[Path],
    settings: Any,
    server: str | None = None,
    out_dir: Path = Path("eval-report"),
    limit: int | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Block / false-refusal rates per label, category and rail, confusion matrix, latency percentiles and
    misses; writes safety.json, safety.md and safety_*.png into out_dir. The result has a "markdown" key."""
    from app.eval.runner import run_guard_eval

    return run_guard_eval("safety", data, settings, server=server, out_dir=out_dir, limit=limit, api_key=api_key)
