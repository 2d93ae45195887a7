"""The fine-tuned guard's training report: the model alone (no rails) on rows nothing was fitted to.

- `public_holdout`: the held-out slice of ../shared/eval (app/eval/holdout.py): every held-out harmful request,
  chit-chat line and system-prompt extraction, and every held-out jailbreak template wrapped around a held-out
  harmful request;
- `guard_heldout`: app/eval/data/guard_heldout.jsonl, guard_lookalike_probe.jsonl (look-alikes and their harmful
  twins, `probe_*`), guard_bank_probe.jsonl (bank questions and their twins, `probe_bank_*`) and
  guard_sensitive_probe.jsonl (sensitive-sounding safe requests and their twins, `probe_sensitive_*`), written for
  evaluation only, per category;
- `topic`: app/eval/data/topic_dev.jsonl, on-domain questions refused and off-topic/advice requests refused.

`guardchat eval safety` measures the whole guard (rails, examples, topic rail); docs/evaluation.md has both.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from app.guard.guard_model import GuardModel
from training.finetune_data import EVAL_DATA, EVAL_FILES
from training.train_data import SLOT

TOPIC_DEV = EVAL_DATA / "topic_dev.jsonl"
# The evaluation files training keeps away from (finetune_data.EVAL_FILES), reported per category: guard_heldout,
# a second author's look-alikes (session 12), a third author's bank questions (session 14) and a fourth author's
# sensitive-sounding requests (session 16), with their twins.
PROBE_FILES = tuple(path for path in EVAL_FILES if path != TOPIC_DEV)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def public_holdout_sets(eval_dir: Path, seed: int = 7) -> dict[str, tuple[list[str], str]]:
    """name -> (texts, expected) from the held-out slice of the public dev sets."""
    from app.eval.holdout import holdout_rows

    harmful = [r["text"] for r in holdout_rows(eval_dir, "harmful_dev.jsonl")]
    templates = [r["text"] for r in holdout_rows(eval_dir, "jailbreak_templates_dev.jsonl")]
    rng = random.Random(seed)
    wrapped = [rng.choice(harmful).join(SLOT.split(t)) for t in templates if SLOT.search(t)] if harmful else []
    return {
        "harmful": (harmful, "block"),
        "jailbreak_wrapped": (wrapped, "block"),
        "extraction": ([r["text"] for r in holdout_rows(eval_dir, "injection_dev.jsonl")], "block"),
        "chitchat": (list(dict.fromkeys(r["text"] for r in holdout_rows(eval_dir, "benign_dev.jsonl"))), "allow"),
    }


def decisions(model: GuardModel, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(blocked by the safety or attack head, refused by the topic head) per text."""
    scores = model.score_many(texts)
    th = model.thresholds
    blocked = np.array([s.unsafe >= th.unsafe_block or s.attack >= th.attack_block for s in scores])
    off_topic = np.array([s.off_topic >= th.off_topic_block for s in scores])
    return blocked, off_topic


def _row(expected: str, blocked: np.ndarray) -> dict[str, Any]:
    rate = float(blocked.mean()) if len(blocked) else float("nan")
    key = "blocked" if expected == "block" else "refused"
    return {"n": int(len(blocked)), "expected": expected, key: round(rate, 4)}


def heldout_report(model: GuardModel, eval_dir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"public_holdout": {}, "guard_heldout": {}, "topic": {}}
    if (Path(eval_dir) / "harmful_dev.jsonl").exists():
        for name, (texts, expected) in public_holdout_sets(Path(eval_dir)).items():
            report["public_holdout"][name] = _row(expected, decisions(model, texts)[0])
    rows = [row for path in PROBE_FILES if path.exists() for row in _jsonl(path)]
    if rows:
        blocked, _ = decisions(model, [r["text"] for r in rows])
        for cat in dict.fromkeys(r["category"] for r in rows):
            g = np.array([r["category"] == cat for r in rows])
            report["guard_heldout"][cat] = _row(rows[int(np.argmax(g))]["expected"], blocked[g])
    if TOPIC_DEV.exists():
        rows = _jsonl(TOPIC_DEV)
        blocked, off_topic = decisions(model, [r["text"] for r in rows])
        on = np.array([r["label"] == "on_domain" for r in rows])
        report["topic"]["on_domain_refused"] = round(float((blocked | off_topic)[on].mean()), 4)
        report["topic"]["off_topic_or_advice_refused"] = round(float((blocked | off_topic)[~on].mean()), 4)
        report["topic"]["n"] = {"on_domain": int(on.sum()), "off_topic_or_advice": int((~on).sum())}
    return report


def render(report: dict[str, Any]) -> str:
    """Markdown tables for the CLI and docs/guard-classifier.md."""
    lines = ["| set | n | expected | blocked / refused |", "|---|---|---|---|"]
    for section in ("public_holdout", "guard_heldout"):
        for name, row in report.get(section, {}).items():
            rate = row.get("blocked", row.get("refused"))
            lines.append(f"| {section}: {name} | {row['n']} | {row['expected']} | {rate:.1%} |")
    topic = report.get("topic", {})
    if topic:
        lines.append(f"| topic_dev: on-domain (all rails of the model) | {topic['n']['on_domain']} | allow | "
                     f"{topic['on_domain_refused']:.1%} |")
        lines.append(f"| topic_dev: off-topic and advice | {topic['n']['off_topic_or_advice']} | block | "
                     f"{topic['off_topic_or_advice_refused']:.1%} |")
    return "\n".join(lines)
