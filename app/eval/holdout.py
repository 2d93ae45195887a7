"""The explicit dev/held-out split of the public dev sets (../shared/eval).

The customer measures on held-out sets we never see. To estimate that honestly, a fixed slice of each
dev file is held out: `guardchat guard train` never trains on it (nor on its near-duplicates, see
train.py), and the measured tables in docs/evaluation.md come from samples of it only.

The split is a pure function of the text (a salted sha256 of the normalised text), so it does not
depend on row order, file version or seed, and a row keeps its side when the files grow. Duplicate texts
land on the same side. Shares per file: 20% of harmful requests, chit-chat and jailbreak templates;
half of the 28 system-prompt extractions (20% would leave ~6 to measure).

    python -m app.eval.holdout --eval-dir ../shared/eval --out data/holdout --seed 7 \\
        --harmful 100 --benign 100 --jailbreak 40 --injection 40

writes one sample file per dev file (`holdout_<file>`), drawn from the held-out rows only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

SALT = "guardchat-holdout-v1"
HOLDOUT_SHARE: dict[str, float] = {
    "harmful_dev.jsonl": 0.2,
    "benign_dev.jsonl": 0.2,
    "jailbreak_templates_dev.jsonl": 0.2,
    "injection_dev.jsonl": 0.5,
}


_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")


def _key(text: str) -> str:
    # Templates that differ only in how their {{ prompt }} slot is written are one template.
    return " ".join(_SLOT.sub(" ", text).lower().split())


def is_holdout(file_name: str, text: str) -> bool:
    """True if `text` of dev file `file_name` belongs to the held-out slice (files without a share: never)."""
    share = HOLDOUT_SHARE.get(file_name, 0.0)
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{SALT}\0{file_name}\0{_key(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def holdout_rows(eval_dir: Path, file_name: str) -> list[dict[str, Any]]:
    """The held-out rows of one dev file, first occurrence of each text only."""
    seen: set[str] = set()
    out = []
    for row in read_jsonl(Path(eval_dir) / file_name):
        key = _key(row["text"])
        if key not in seen and is_holdout(file_name, row["text"]):
            seen.add(key)
            out.append(row)
    return out


def write_samples(eval_dir: Path, out_dir: Path, counts: dict[str, int], seed: int = 7) -> dict[str, int]:
    """A seeded sample of `counts[file]` held-out rows per file (all of them if fewer) -> out_dir/holdout_<file>."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for file_name, n in counts.items():
        rows = holdout_rows(eval_dir, file_name)
        sample = rng.sample(rows, n) if n < len(rows) else rows
        (out_dir / f"holdout_{file_name}").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample), encoding="utf-8")
        written[file_name] = len(sample)
    return written


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write seeded samples of the held-out dev slice.")
    parser.add_argument("--eval-dir", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "eval")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--harmful", type=int, default=100)
    parser.add_argument("--benign", type=int, default=100)
    parser.add_argument("--jailbreak", type=int, default=40)
    parser.add_argument("--injection", type=int, default=40)
    args = parser.parse_args()
    counts = {"harmful_dev.jsonl": args.harmful, "benign_dev.jsonl": args.benign,
              "jailbreak_templates_dev.jsonl": args.jailbreak, "injection_dev.jsonl": args.injection}
    for name, n in write_samples(args.eval_dir, args.out, counts, args.seed).items():
        total = len(holdout_rows(args.eval_dir, name))
        print(f"{args.out / ('holdout_' + name)}: {n} rows (of {total} held out)")


if __name__ == "__main__":
    main()
