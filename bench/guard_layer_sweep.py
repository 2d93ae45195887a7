"""How many bottom layers can the guard share with retrieval? Fits the guard with K frozen layers and scores its
validation split (a tenth of the training rows; no evaluation row): unsafe-head recall on harmful rows at the
threshold that refuses 1% / 3% of benign validation rows, false refusals per benign source there, attack recall.

Made for the GPU machine (seconds a fit), from an unpacked base (training/finetune_remote.py):

    PYTHONPATH=$PWD python -m bench.guard_layer_sweep --base /tmp/base --frozen 2 3 0 --keep 2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import training.finetune as ft


def val_metrics(logits: np.ndarray, val: list[dict[str, Any]]) -> dict[str, float]:
    src = np.array([r["source"] for r in val])
    unsafe, attack = logits[:, 0], logits[:, 1]
    benign = np.array([r["unsafe"] == 0 and r["attack"] == 0 for r in val])
    out: dict[str, float] = {}
    for fpr in (0.01, 0.03):
        th = np.quantile(unsafe[benign], 1 - fpr)
        harmful = np.isin(src, ["harmful", "wrapped"])
        out[f"harmful_recall@benignFPR{fpr}"] = round(float((unsafe[harmful] > th).mean()), 4)
        out[f"harmful_only_recall@{fpr}"] = round(float((unsafe[src == "harmful"] > th).mean()), 4)
        for s in ("lookalike", "instruction", "technical", "injection_lookalike", "alarming"):
            out[f"{s}_fp@{fpr}"] = round(float((unsafe[src == s] > th).mean()), 4)
    attacks = np.isin(src, ["template", "wrapped", "injection", "our_attack"])
    out["attack_recall@benignFPR0.03"] = round(float((attack[attacks] > np.quantile(attack[benign], 0.97)).mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="unpacked base with rows.jsonl")
    parser.add_argument("--frozen", type=int, nargs="+", default=[2])
    parser.add_argument("--keep", type=int, default=None, help="save the shards of this K under --out/kK")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.base / "rows.jsonl").read_text(encoding="utf-8").split("\n") if line]
    val = [r for r in rows if r["split"] == "val"]
    for k in args.frozen:
        ft.FROZEN_LAYERS = k  # read at call time by build_network / is_trained
        net, summary = ft.fit(rows, args.base, log=lambda m, k=k: print(k, m, flush=True))
        if k == args.keep:
            ft.save_weights(net, args.out / f"k{k}")
            (args.out / f"k{k}" / "fit.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        logits = ft.predict(net, args.base, [r["text"] for r in val])
        print("RESULT", json.dumps({"frozen": k, "fit_seconds": summary["seconds"], **val_metrics(logits, val)}))


if __name__ == "__main__":
    main()
