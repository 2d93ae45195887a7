"""py-spy helpers: record a running server for a while and list its hot spots.

`record(pid, seconds, out)` writes py-spy's collapsed-stack ("raw") profile; `hot_spots(path)` turns it
into the functions with the most samples, by self time and by inclusive time (so both "what burns the
CPU" and "which stage of ours is responsible" are visible).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start_recording(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Starts `py-spy record` in the background (None when py-spy is not installed)."""
    exe = py_spy()
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
            "--format", "raw", "--output", str(out), "--subprocesses", "--nonblocking"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep function + short path.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def hot_spots(path: Path, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    """{"self": [(frame, % of samples)], "inclusive": [...]} from a raw py-spy profile."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    if not total:
        return {"self": [], "inclusive": []}
    return {
        "self": [(f, round(100 * c / total, 1)) for f, c in self_counts.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl_counts.most_common(top * 2)],
        "samples": [("total", float(total))],
    }
