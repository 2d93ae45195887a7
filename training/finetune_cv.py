"""K-fold cross-validation of the guard's fit: out-of-fold scores for every training row.

The validation split says how well the shipped fit does on rows like its training rows; out-of-fold scores say
which *kinds* of rows a fit that never saw them gets wrong, for every row we have, so new data can target the
kinds that generalise worst (never the held-out evaluation rows: they are not in the rows file). Same fit as
`finetune.fit` (seed, epochs, frozen layers); folds by a hash of the text, train-split rows only.

    python -m training.finetune_cv --rows rows.jsonl --base DIR --out oof.jsonl --folds 5     # GPU: ~2 minutes
    python -m training.finetune_cv --summary oof.jsonl                                         # per source
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from app.guard.guard_model import ATTACK_COL, UNSAFE_COL
from training.finetune import EPOCHS


def fold_of(text: str, folds: int) -> int:
    digest = hashlib.sha256(f"guard-cv-v1\0{text.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def out_of_fold(rows: list[dict[str, Any]], base: Path, folds: int, seed: int, epochs: int) -> list[dict[str, Any]]:
    """Each train-split row scored by the fit that left its fold out: unsafe and attack probabilities."""
    from training.finetune import fit, predict

    train = [r for r in rows if r["split"] == "train"]
    out: list[dict[str, Any]] = []
    for k in range(folds):
        held = [r for r in train if fold_of(r["text"], folds) == k]
        fold_rows = [{**r, "split": "train" if fold_of(r["text"], folds) != k else "cv"} for r in train]
        net, summary = fit(fold_rows, base, seed=seed, epochs=epochs)
        logits = predict(net, base, [r["text"] for r in held])
        for r, z in zip(held, logits, strict=True):
            out.append({"text": r["text"], "source": r["source"], "origin": r.get("origin", r["source"]),
                        "unsafe": r["unsafe"], "attack": r["attack"],
                        "cats": r["cats"], "fold": k, "p_unsafe": round(float(_sigmoid(z[UNSAFE_COL])), 4),
                        "p_attack": round(float(_sigmoid(z[ATTACK_COL])), 4)})
        print(json.dumps({"fold": k, "held": len(held), **summary}), flush=True)
    return out


def read_oof(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def summary(oof: list[dict[str, Any]], threshold: float = 0.5) -> dict[str, dict[str, float | None]]:
    """Per source (and per origin of the harmful rows: a public set's category, or our file): rows, and the share
    blocked (either head ≥ threshold) among should-block / should-allow rows."""
    table: dict[str, dict[str, float | None]] = {}
    keys = sorted({r["source"] for r in oof}) + sorted({f"harmful/{r.get('origin')}" for r in oof
                                                        if r["source"] == "harmful"})
    for source in keys:
        rows = [r for r in oof if source in (r["source"], f"{r['source']}/{r.get('origin')}")]
        blocked = [max(r["p_unsafe"], r["p_attack"]) >= threshold for r in rows]
        harmful = [b for r, b in zip(rows, blocked, strict=True) if (r["unsafe"] or r["attack"])]
        benign = [b for r, b in zip(rows, blocked, strict=True) if not (r["unsafe"] or r["attack"])]
        table[source] = {"n": len(rows),
                         "blocked_of_harmful": round(float(np.mean(harmful)), 4) if harmful else None,
                         "blocked_of_benign": round(float(np.mean(benign)), 4) if benign else None}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=Path)
    parser.add_argument("--base", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--no-balance", action="store_true", help="fit with finetune.BALANCE off")
    parser.add_argument("--summary", type=Path, help="print the per-source table of an out-of-fold file")
    args = parser.parse_args()
    if args.summary:
        print(json.dumps(summary(read_oof(args.summary)), indent=1))
        return
    if not (args.rows and args.base and args.out):
        parser.error("--rows, --base and --out are needed to run the folds")
    if args.no_balance:
        from training import finetune

        finetune.BALANCE = False
    rows = [json.loads(line) for line in args.rows.read_text(encoding="utf-8").split("\n") if line]
    oof = out_of_fold(rows, args.base, args.folds, args.seed, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in oof), encoding="utf-8")


if __name__ == "__main__":
    main()
