"""The cross-validation report of `guardchat guard train`: per-source rates at the chosen thresholds, the
unsafe_block sweep, and their rendering for the CLI (rich) and docs/guard-classifier.md (markdown)."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.guard.detector import TOPIC_LABELS
from training.train_data import ON_DOMAIN_SOURCES, Item


def unsafe_block_sweep(items: list[Item], unsafe_p: np.ndarray) -> dict[str, dict[str, float]]:
    """Out-of-fold share of each source the unsafe head alone would block at candidate `unsafe_block` values:
    the guide for moving the threshold in the rails config (the judge's band shrinks or grows with it)."""
    src = np.array([it.source for it in items])
    return {f"{t:.2f}": {s: float((unsafe_p[src == s] >= t).mean()) for s in dict.fromkeys(src.tolist())}
            for t in np.arange(0.20, 0.61, 0.05)}


def harmful_by_category(items: list[Item], unsafe_p: np.ndarray, th: dict[str, float]) -> dict[str, dict[str, float]]:
    """Bare harmful requests per Llama Guard category (keyword-labelled; a row counts in each of its categories):
    where the unsafe head is weakest, i.e. which kinds of harm the training data under-covers."""
    out: dict[str, dict[str, float]] = {}
    for cat in sorted({c for it in items for c in it.categories}, key=lambda c: int(c[1:])):
        g = np.array([it.source == "harmful" and cat in it.categories for it in items])
        if g.any():
            out[cat] = {"n": int(g.sum()), "auto_block": float((unsafe_p[g] >= th["unsafe_block"]).mean()),
                        "allow": float((unsafe_p[g] < th["unsafe_allow"]).mean()),
                        "median": float(np.median(unsafe_p[g]))}
    return out


def cv_report(items: list[Item], unsafe_p: np.ndarray, attack_p: np.ndarray, off_topic_p: np.ndarray,
              topic_pred: np.ndarray, th: dict[str, float]) -> dict[str, Any]:
    """Per source: auto-blocked / sent to the judge / allowed, plus the per-head block rates."""
    src = np.array([it.source for it in items])
    u_block, a_block = unsafe_p >= th["unsafe_block"], attack_p >= th["attack_block"]
    block = u_block | a_block
    allow = (unsafe_p < th["unsafe_allow"]) & (attack_p < th["attack_allow"])
    rows = {}
    for s in dict.fromkeys(src.tolist()):
        g = src == s
        rows[s] = {"n": int(g.sum()), "unsafe_head_block": float(u_block[g].mean()),
                   "attack_head_block": float(a_block[g].mean()), "auto_block": float(block[g].mean()),
                   "judge": float((~block & ~allow)[g].mean()), "allow": float(allow[g].mean())}
    topic_rows: dict[str, Any] = {}
    for s in ("advice", "off_topic", "general", "chitchat", "unanswerable", "harmful", "borderline",
              *ON_DOMAIN_SOURCES):
        wanted = ("on_domain",) if s in ON_DOMAIN_SOURCES else tuple(TOPIC_LABELS)  # general look-alikes are off-topic
        g = (src == s) & np.array([it.topic in wanted for it in items])
        if g.any():
            refused = off_topic_p[g] >= th["off_topic_block"]
            topic_rows[s] = {"n": int(g.sum()), "topic_refusal": float(refused.mean())}
    advice = np.array([it.topic in ("investment_advice", "legal_advice", "tax_advice") for it in items])
    topic_rows["advice_class_accuracy"] = float(
        np.mean([TOPIC_LABELS[k] == it.topic for k, it, a in zip(topic_pred, items, advice, strict=True) if a]))
    return {"safety": rows, "topic": topic_rows}


def print_summary(report: dict[str, Any]) -> None:
    """The CV table the CLI prints (rates at the chosen thresholds; 'judge' = uncertain band)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Guard classifier, {report['folds']}-fold grouped CV (out-of-fold)")
    for col in ("source", "n", "unsafe head", "attack head", "auto-block", "judge band", "auto-allow"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for source, r in report["cv"]["safety"].items():
        cols = ("unsafe_head_block", "attack_head_block", "auto_block", "judge", "allow")
        table.add_row(source, str(r["n"]), *(f"{100 * r[k]:.1f}%" for k in cols))
    console.print(table)
    topic = Table(title="Topic rail (refused = off_topic >= off_topic_block)")
    topic.add_column("source")
    topic.add_column("n", justify="right")
    topic.add_column("refused", justify="right")
    for source, r in report["cv"]["topic"].items():
        if isinstance(r, dict):
            topic.add_row(source, str(r["n"]), f"{100 * r['topic_refusal']:.1f}%")
    console.print(topic)
    console.print(f"advice sub-class accuracy: {100 * report['cv']['topic']['advice_class_accuracy']:.1f}%")
    by_cat = report["cv"].get("harmful_by_category", {})
    if by_cat:
        console.print("harmful requests per category (auto-block / auto-allow / median unsafe): " + ", ".join(
            f"{c} n={r['n']} {100 * r['auto_block']:.0f}%/{100 * r['allow']:.0f}%/{r['median']:.2f}"
            for c, r in by_cat.items()))
    console.print("thresholds: " + ", ".join(f"{k}={v:.3f}" for k, v in report["thresholds"].items()))


def report_markdown(report: dict[str, Any]) -> str:
    """The same tables as markdown (docs/guard-classifier.md quotes them)."""
    lines = ["| source | n | unsafe head | attack head | auto-block | judge band | auto-allow |", "|---" * 7 + "|"]
    cols = ("unsafe_head_block", "attack_head_block", "auto_block", "judge", "allow")
    for source, r in report["cv"]["safety"].items():
        lines.append(f"| {source} | {r['n']} | " + " | ".join(f"{100 * r[k]:.1f}%" for k in cols) + " |")
    lines += ["", "| topic rail: source | n | refused |", "|---|---|---|"]
    for source, r in report["cv"]["topic"].items():
        if isinstance(r, dict):
            lines.append(f"| {source} | {r['n']} | {100 * r['topic_refusal']:.1f}% |")
    return "\n".join(lines) + "\n"
