"""`guardchat guard train`: fit the stage-1 detector heads (app/guard/detector.py) on MiniLM embeddings.

Data: the public dev sets in ../shared/eval (harmful requests, jailbreak templates, chit-chat,
system-prompt extraction, SQuAD-style questions) plus our own rows in training/data/.
Method: class-balanced logistic regression per head (scikit-learn here only; inference is numpy),
Platt-calibrated on grouped k-fold out-of-fold scores; thresholds are chosen from those same
out-of-fold scores. Jailbreak templates are wrapped around harmful requests only within a fold,
and near-duplicate texts share a fold, so a fold never sees its own templates or requests.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.eval.holdout import HOLDOUT_SHARE, SALT
from app.guard.detector import (
    LEXICAL_FEATURES,
    LLAMA_GUARD_CATEGORIES,
    MAX_WINDOWS,
    TOPIC_LABELS,
    WEIGHTS_STEM,
    WINDOW_STRIDE,
    WINDOW_WORDS,
    build_features,
    text_windows,
)
from training.train_data import (
    ATTACK_SOURCES,
    BENIGN_SOURCES,
    SLOT,
    TRAINING_DATA_DIR,
    UNSAFE_SOURCES,
    Item,
    file_hash,
    heldout_texts,
    load_sources,
)

CATEGORY_LABELS = list(LLAMA_GUARD_CATEGORIES)
C_REG = 4.0
# Share of each harmful source that must reach at least the judge band. Not 0.98: the embedded judge does not
# separate harmful from benign inside the band (docs/evaluation.md), so a wide band bought benign refusals and
# judge timeouts, not recall; the harmful requests below it are the topic rail's (it learns them as off_topic).
HARMFUL_RECALL_TARGET = 0.90
ATTACK_RECALL_TARGET = 0.95  # the same for each attack source (short injections sit close to benign look-alikes)
AUTO_BLOCK_BENIGN_FRR = 0.01  # benign share we accept blocking without the judge
ON_DOMAIN_TOPIC_REFUSAL = 0.03
WRAPS_PER_TEMPLATE = 2
NEAR_DUPLICATE = 0.9  # cosine between head embeddings: a training row this close to a held-out row is dropped

def drop_near_heldout(items: list[Item], heads: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Mask of training items to keep: not within NEAR_DUPLICATE cosine of any held-out text (AdvBench and the
    template set are full of paraphrases; training on one would leak its held-out twin)."""
    if len(held) == 0:
        return np.ones(len(items), dtype=bool)
    return np.asarray((heads @ held.T).max(axis=1) < NEAR_DUPLICATE)


class EmbeddingCache:
    """MiniLM vectors keyed by text hash, kept on disk: retraining re-embeds only new windows."""

    def __init__(self, embedder: Any, path: Path | None) -> None:
        self.embedder, self.path, self.vectors = embedder, path, {}
        if path is not None and path.exists():
            with np.load(path) as npz:
                self.vectors = dict(zip(npz["keys"].tolist(), npz["vecs"], strict=True))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def get(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if self.key(t) not in self.vectors))
        if missing:
            for key, vec in zip((self.key(t) for t in missing), self.embedder.embed(missing), strict=True):
                self.vectors[key] = vec
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                keys = sorted(self.vectors)
                np.savez(self.path, keys=np.array(keys), vecs=np.stack([self.vectors[k] for k in keys]))
        return np.stack([self.vectors[self.key(t)] for t in texts]).astype(np.float32)


def assign_folds(items: list[Item], heads: np.ndarray, folds: int, rng: random.Random) -> np.ndarray:
    """Near-duplicates (cosine >= 0.9 on the head embedding) share a fold; folds are filled per source."""
    sims = heads @ heads.T
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(sims >= 0.9, k=1)), strict=True):
        parent[find(int(i))] = find(int(j))
    roots = [find(i) for i in range(len(items))]
    fold_of_root: dict[int, int] = {}
    by_source: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_source.setdefault(it.source, []).append(roots[i])
    for source in sorted(by_source):
        clusters = sorted(set(by_source[source]) - set(fold_of_root))
        rng.shuffle(clusters)
        offset = rng.randrange(folds)
        for n, root in enumerate(clusters):
            fold_of_root[root] = (n + offset) % folds
    return np.array([fold_of_root[r] for r in roots])


def wrap_templates(items: list[Item], fold: np.ndarray, rng: random.Random) -> tuple[list[Item], list[int]]:
    """Each template x WRAPS_PER_TEMPLATE harmful requests from the same fold (and never another fold's)."""
    harmful_by_fold: dict[int, list[Item]] = {}
    for it, f in zip(items, fold, strict=True):
        if it.source == "harmful":
            harmful_by_fold.setdefault(int(f), []).append(it)
    wrapped, wrapped_fold = [], []
    for it, f in zip(items, fold, strict=True):
        pool = harmful_by_fold.get(int(f), [])
        if it.slot_text is None or not SLOT.search(it.slot_text) or not pool:
            continue
        for request in rng.sample(pool, min(WRAPS_PER_TEMPLATE, len(pool))):
            text = request.text.join(SLOT.split(it.slot_text))  # no regex escapes in the request
            wrapped.append(Item(text, "wrapped", 1, 1, categories=request.categories, payload=request.text))
            wrapped_fold.append(int(f))
    return wrapped, wrapped_fold


@dataclass
class WindowRows:
    """The feature rows of every window of every item, with per-row labels and the owning item index."""

    x: np.ndarray
    item: np.ndarray
    unsafe: np.ndarray  # -1 = not used by the head
    attack: np.ndarray
    topic: np.ndarray  # index into TOPIC_LABELS, -1 = not used
    cats: np.ndarray  # (rows, 14) multi-hot, only meaningful where unsafe == 1
    source: np.ndarray


def window_rows(items: list[Item], cache: EmbeddingCache) -> WindowRows:
    texts, owner, unsafe, attack, topic, cats = [], [], [], [], [], []
    for idx, it in enumerate(items):
        wins = text_windows(it.text)
        for w_idx, win in enumerate(wins):
            visible = " ".join(win.split()[:WINDOW_WORDS]) if w_idx == 0 else win  # MiniLM keeps only the head
            u = it.unsafe
            if it.payload is not None:  # windows without the request are jailbreak text, not harmful text
                u = 1 if it.payload in visible else None
            texts.append(win)
            owner.append(idx)
            unsafe.append(-1 if u is None else u)
            attack.append(-1 if it.attack is None else it.attack)
            topic.append(TOPIC_LABELS.index(it.topic) if it.topic and w_idx == 0 else -1)
            cats.append([1 if c in it.categories else 0 for c in CATEGORY_LABELS])
    x = build_features(cache.get(texts), texts).astype(np.float64)
    source = np.array([items[i].source for i in owner])
    return WindowRows(x, np.array(owner), np.array(unsafe), np.array(attack), np.array(topic), np.array(cats), source)


def source_weights(y: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Each class weighs the same in total; inside a class a source of n rows weighs ~sqrt(n), so 2,000 template
    windows do not drown 28 short injections (nor 750 chit-chat lines our 70 alarming-but-fine bank questions)."""
    weights = np.zeros(len(y))
    for label in np.unique(y):
        in_class = y == label
        for s in np.unique(source[in_class]):
            rows = in_class & (source == s)
            weights[rows] = 1.0 / np.sqrt(rows.sum())
        weights[in_class] /= weights[in_class].sum()
    return weights * len(y) / len(np.unique(y))


def _logreg(x: np.ndarray, y: np.ndarray, seed: int, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C_REG, max_iter=5000, random_state=seed)
    model.fit(x, y, sample_weight=source_weights(y, source))
    return model.coef_, model.intercept_


def fit_heads(rows: WindowRows, mask: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """All heads on the rows selected by `mask`; returns the arrays detector.py loads (minus calibration)."""
    out: dict[str, np.ndarray] = {}
    for head in ("unsafe", "attack"):
        y = getattr(rows, head)
        sel = mask & (y >= 0)
        w, b = _logreg(rows.x[sel], y[sel], seed, rows.source[sel])
        out[f"{head}_w"], out[f"{head}_b"] = w[0], b[0:1]
    sel = mask & (rows.topic >= 0)
    present = np.unique(rows.topic[sel])
    w, b = _logreg(rows.x[sel], rows.topic[sel], seed, rows.source[sel])
    if len(present) == 2:  # binary LR returns one row: the second class's logit
        w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    out["topic_w"] = np.zeros((len(TOPIC_LABELS), rows.x.shape[1]))
    out["topic_b"] = np.full(len(TOPIC_LABELS), -10.0)  # a class without rows (tiny subsamples) is never chosen
    out["topic_w"][present], out["topic_b"][present] = w, b
    sel = mask & (rows.unsafe == 1)
    cat_w = np.zeros((len(CATEGORY_LABELS), rows.x.shape[1]))
    cat_b = np.full(len(CATEGORY_LABELS), -6.0)
    for c in range(len(CATEGORY_LABELS)):
        y = rows.cats[sel, c]
        if 3 <= y.sum() <= len(y) - 3:
            w, b = _logreg(rows.x[sel], y, seed, rows.source[sel])
            cat_w[c], cat_b[c] = w[0], b[0]
    out["cat_w"], out["cat_b"] = cat_w, cat_b
    return out


def _platt(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e4, max_iter=1000).fit(logits.reshape(-1, 1), labels)
    return np.array([model.coef_[0, 0], model.intercept_[0]])


def _item_max(values: np.ndarray, owner: np.ndarray, n_items: int) -> np.ndarray:
    out = np.full(n_items, -np.inf)
    np.maximum.at(out, owner, values)
    return out


def choose_thresholds(items: list[Item], unsafe_p: np.ndarray, attack_p: np.ndarray,
                      off_topic_p: np.ndarray) -> dict[str, float]:
    src = np.array([it.source for it in items])
    benign_groups = [src == s for s in BENIGN_SOURCES if s != "borderline" and (src == s).any()]

    def block_threshold(p: np.ndarray, allow: float) -> float:
        # lowest threshold at which no benign source is auto-blocked more than AUTO_BLOCK_BENIGN_FRR
        worst = max(float(np.quantile(p[g], 1 - AUTO_BLOCK_BENIGN_FRR)) for g in benign_groups)
        return float(min(0.99, max(allow + 0.05, worst + 1e-6)))

    def allow_threshold(p: np.ndarray, sources: tuple[str, ...], recall: float) -> float:
        # every positive source (not just the pooled set) must reach the judge band `recall` of the time
        lows = [float(np.quantile(p[src == s], 1 - recall)) for s in sources if (src == s).any()]
        return float(np.clip(min(lows), 0.02, 0.5))

    unsafe_allow = allow_threshold(unsafe_p, UNSAFE_SOURCES, HARMFUL_RECALL_TARGET)
    attack_allow = allow_threshold(attack_p, ATTACK_SOURCES, ATTACK_RECALL_TARGET)
    on_domain = np.array([it.topic == "on_domain" for it in items])
    topic_t = float(np.clip(np.quantile(off_topic_p[on_domain], 1 - ON_DOMAIN_TOPIC_REFUSAL) + 1e-6, 0.3, 0.95))
    return {"unsafe_block": block_threshold(unsafe_p, unsafe_allow), "unsafe_allow": unsafe_allow,
            "attack_block": block_threshold(attack_p, attack_allow), "attack_allow": attack_allow,
            "off_topic_block": topic_t}


@dataclass
class _Prepared:
    """The training items (bare rows, then jailbreak-wrapped ones), their windows' rows and folds."""

    items: list[Item]
    rows: Any
    row_fold: np.ndarray
    held: list[str]
    dropped: dict[str, int]


def _prepare(eval_dir: Path, embedder: Any, rng: random.Random, folds: int, max_per_source: int | None,
             cache_path: Path | None) -> _Prepared:
    """Sources -> near-held-out rows dropped -> folds -> wrapped templates -> windowed feature rows."""
    sources = load_sources(Path(eval_dir), rng, max_per_source)
    bare = [it for name in sorted(sources) for it in sources[name]]
    cache = EmbeddingCache(embedder, cache_path)
    heads = cache.get([it.text for it in bare])
    held = heldout_texts(Path(eval_dir))
    keep = drop_near_heldout(bare, heads, cache.get(held) if held else np.zeros((0, heads.shape[1])))
    dropped = {s: int(sum(1 for it, k in zip(bare, keep, strict=True) if it.source == s and not k))
               for s in sources}
    bare, heads = [it for it, k in zip(bare, keep, strict=True) if k], heads[keep]
    fold = assign_folds(bare, heads, folds, rng)
    wrapped, wrapped_fold = wrap_templates(bare, fold, rng)
    items = bare + wrapped
    item_fold = np.concatenate([fold, np.array(wrapped_fold, dtype=int)])
    rows = window_rows(items, cache)
    return _Prepared(items, rows, item_fold[rows.item], held, dropped)


def _out_of_fold(data: _Prepared, folds: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                                   np.ndarray]:
    """Out-of-fold logits per window, then per item (max over windows for unsafe/attack, the first window for the
    topic) -> (Platt calibration per head, calibrated probabilities per head, topic probabilities)."""
    rows, row_fold, n = data.rows, data.row_fold, len(data.items)
    oof = {"unsafe": np.zeros(len(rows.x)), "attack": np.zeros(len(rows.x))}
    oof_topic = np.zeros((len(rows.x), len(TOPIC_LABELS)))
    for k in range(folds):
        fitted = fit_heads(rows, row_fold != k, seed)
        test = row_fold == k
        for head in oof:
            oof[head][test] = rows.x[test] @ fitted[f"{head}_w"] + fitted[f"{head}_b"][0]
        oof_topic[test] = rows.x[test] @ fitted["topic_w"].T + fitted["topic_b"]
    item_logit = {h: _item_max(v, rows.item, n) for h, v in oof.items()}
    labels = {"unsafe": np.array([1 if it.source in UNSAFE_SOURCES else 0 for it in data.items]),
              "attack": np.array([1 if it.source in ATTACK_SOURCES else 0 for it in data.items])}
    cal = {h: _platt(item_logit[h], labels[h]) for h in oof}
    prob = {h: 1 / (1 + np.exp(-(cal[h][0] * item_logit[h] + cal[h][1]))) for h in oof}
    head_rows = np.zeros(n, dtype=int)
    head_rows[rows.item[::-1]] = np.arange(len(rows.item))[::-1]  # first window of each item
    topic_logits = oof_topic[head_rows]
    topic_p = np.exp(topic_logits - topic_logits.max(1, keepdims=True))
    return cal, prob, topic_p / topic_p.sum(1, keepdims=True)


def train(eval_dir: Path, out_dir: Path, *, seed: int = 1234, folds: int = 5, embedder: Any = None,
          max_per_source: int | None = None, cache_path: Path | None = None) -> dict[str, Any]:
    """Cross-validate, choose thresholds, fit on all data, write detector.npz/.json + report json to `out_dir`.
    `max_per_source` subsamples every source (tests); `cache_path` keeps MiniLM vectors between runs."""
    if embedder is None:  # fp32 PyTorch: the same vectors on every machine (bf16 exists on some CPUs only)
        from app.rag.embedder import MiniLMEmbedder

        embedder = MiniLMEmbedder(precision="float32")
    data = _prepare(eval_dir, embedder, random.Random(seed), folds, max_per_source, cache_path)
    items = data.items
    cal, prob, topic_p = _out_of_fold(data, folds, seed)
    off_topic_p = 1 - topic_p[:, TOPIC_LABELS.index("on_domain")]
    thresholds = choose_thresholds(items, prob["unsafe"], prob["attack"], off_topic_p)
    from training.train_report import cv_report, harmful_by_category, unsafe_block_sweep  # imports our constants

    report = cv_report(items, prob["unsafe"], prob["attack"], off_topic_p, topic_p.argmax(1), thresholds)
    report["harmful_by_category"] = harmful_by_category(items, prob["unsafe"], thresholds)
    report["unsafe_block_sweep"] = unsafe_block_sweep(items, prob["unsafe"])
    final = fit_heads(data.rows, np.ones(len(data.rows.x), dtype=bool), seed)
    final["unsafe_cal"], final["attack_cal"] = cal["unsafe"], cal["attack"]
    meta = _write_detector(Path(out_dir), final, data, thresholds, eval_dir, embedder,
                           {"seed": seed, "folds": folds, "C": C_REG, "max_per_source": max_per_source})
    full_report = {"thresholds": thresholds, "cv": report, "calibration": {h: c.tolist() for h, c in cal.items()},
                   "counts": meta["counts"], "seed": seed, "folds": folds, "holdout": meta["holdout"]}
    (Path(out_dir) / "train_report.json").write_text(json.dumps(full_report, indent=2) + "\n", encoding="utf-8")
    return full_report


def _write_detector(out_dir: Path, final: dict[str, np.ndarray], data: _Prepared, thresholds: dict[str, float],
                    eval_dir: Path, embedder: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """detector.npz (the heads) and detector.json (thresholds, labels, provenance); returns the json."""
    import sklearn

    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.astype(np.float32) for k, v in final.items()}
    np.savez_compressed(out_dir / f"{WEIGHTS_STEM}.npz", **arrays)  # type: ignore[arg-type]
    data_files = sorted(Path(eval_dir).glob("*.jsonl")) + sorted(TRAINING_DATA_DIR.glob("*.jsonl"))
    items = data.items
    meta = {
        "thresholds": thresholds,
        "category_labels": CATEGORY_LABELS,
        "topic_labels": list(TOPIC_LABELS),
        "lexical_features": list(LEXICAL_FEATURES),
        "windows": {"words": WINDOW_WORDS, "stride": WINDOW_STRIDE, "max": MAX_WINDOWS},
        **settings,
        "data_sha256": {p.name: file_hash(p) for p in data_files},
        "counts": {s: int(sum(1 for it in items if it.source == s)) for s in dict.fromkeys(it.source for it in items)},
        "windows_total": int(len(data.rows.x)),
        "holdout": {"salt": SALT, "shares": HOLDOUT_SHARE, "held_out_rows": len(data.held),
                    "near_duplicates_dropped": {k: v for k, v in data.dropped.items() if v}},
        "versions": {"scikit-learn": sklearn.__version__, "numpy": np.__version__,
                     "embedder": Path(str(getattr(embedder, "model_path", "minilm"))).name},
    }
    (out_dir / f"{WEIGHTS_STEM}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--eval-dir", type=Path, default=root.parent / "shared" / "eval")
    parser.add_argument("--out", type=Path, default=root / "app" / "guard" / "weights")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=root / "data" / "cache" / "guard_embeddings.npz")
    args = parser.parse_args()
    from training.train_report import print_summary

    print_summary(train(args.eval_dir, args.out, seed=args.seed, folds=args.folds, cache_path=args.cache))


if __name__ == "__main__":
    main()
