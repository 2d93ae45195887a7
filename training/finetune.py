"""Fine-tunes all-MiniLM-L6-v2's upper layers into the guard's multi-head classifier (app/guard/guard_model.py).

Needs only torch, transformers, safetensors and tokenizers, so it runs here on the CPU (`guardchat guard train`)
or on a GPU machine from a rows file (`python -m training.finetune --rows ... --base ... --out ...`).

Method: the encoder's mean-pooled output feeds one linear layer [unsafe, attack, S1..S14, topic x5]. Losses,
each masked to the rows that carry its label: binary cross-entropy for unsafe and attack, multi-label BCE for
the categories (harmful rows only), cross-entropy for the topic. Every source (a data file, or a kind within
ours) weighs ~sqrt(its size) in total, so 2,000 chit-chat lines do not drown 60 injection look-alikes, and the
rows to block weigh as much as the rows to allow (BALANCE: 16 benign sources outweighed 5 harmful ones 2.2:1). The
embeddings and the bottom FROZEN_LAYERS layers stay the pretrained model's: the server computes them once for
the guard and the retrieval embedding (one pass per message, not two). Their outputs are computed once per row,
then each epoch trains the top layers and the head. Seeded; on a GPU the run is deterministic up to cuDNN's
float reductions.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.guard.guard_model import (
    ATTACK_COL,
    CATEGORY_CODES,
    CATS,
    N_OUTPUTS,
    TOKENIZER_FILE,
    TOPICS,
    UNSAFE_COL,
    encode_ids,
    load_tokenizer,
    pad_batch,
)

EPOCHS = 6  # 5-fold CV (training/finetune_cv.py): 6 beat 4 on harmful rows unlike the training rows
BATCH = 32
LR_ENCODER = 8e-5  # four layers train, not six: a little faster
LR_HEAD = 1e-3
WARMUP = 0.06
WEIGHT_DECAY = 0.01
SHARD_BYTES = 14 * 2**20  # weight files back from a GPU machine must stay under 16 MiB each


BALANCE = True  # see source_weights
FROZEN_LAYERS = 2  # the pretrained bottom layers, shared with the retrieval embedding (guard_model.py)


def build_network(base_dir: Path) -> Any:
    import torch
    from transformers import AutoModel

    class GuardNet(torch.nn.Module):
        """MiniLM -> mean pooling over real tokens -> dropout -> one linear layer of N_OUTPUTS logits.

        `bottom` (word/position embeddings and the first FROZEN_LAYERS layers) keeps the pretrained weights:
        what it computes is also the retrieval embedding's first layers, so one pass serves both (the exported
        graph, finetune_export.py). `top` is the fine-tuned rest."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(
                str(base_dir), local_files_only=True, attn_implementation="eager"
            ).float()
            self.dropout = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, N_OUTPUTS)

        def run_layers(self, hidden: Any, attention_mask: Any, layers: Any) -> Any:
            # The additive mask eager attention takes (0 = attend, most negative = padding), built here rather
            # than by transformers' mask helpers, whose names change between versions (a GPU machine may run
            # another one); BertLayer returns a tensor in transformers 5, a tuple before.
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            for layer in layers:
                out = layer(hidden, mask)
                hidden = out[0] if isinstance(out, tuple) else out
            return hidden

        def bottom(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder.embeddings(input_ids=input_ids)
            return self.run_layers(hidden, attention_mask, self.encoder.encoder.layer[:FROZEN_LAYERS])

        def top(self, hidden: Any, attention_mask: Any) -> Any:
            hidden = self.run_layers(hidden, attention_mask, self.encoder.encoder.layer[FROZEN_LAYERS:])
            return self.head(self.dropout(mean_pool(hidden, attention_mask)))

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.top(self.bottom(input_ids, attention_mask), attention_mask)

    return GuardNet()


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-6)


def is_trained(name: str) -> bool:
    """The parameters fine-tuning changes (and `save_weights` ships): the top layers and the head."""
    top = tuple(f"encoder.encoder.layer.{i}." for i in range(FROZEN_LAYERS, 64))
    return name.startswith((*top, "head."))


def source_weights(rows: list[dict[str, Any]], balance: bool = False) -> np.ndarray:
    """Every source weighs ~sqrt(its size); with `balance`, rows to block and rows to allow weigh half each."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    w = np.array([1.0 / math.sqrt(counts[r["source"]]) for r in rows])
    if balance:
        blocks = np.array([bool(r["unsafe"] == 1 or r["attack"] == 1) for r in rows])
        if blocks.any() and (~blocks).any():
            w[blocks] *= w[~blocks].sum() / w[blocks].sum()
    return w * len(w) / w.sum()


def _targets(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    n = len(rows)
    t = {"unsafe": np.full(n, -1.0), "attack": np.full(n, -1.0), "topic": np.full(n, -1),
         "cats": np.zeros((n, len(CATEGORY_CODES)))}
    for i, r in enumerate(rows):
        if r["unsafe"] is not None:
            t["unsafe"][i] = r["unsafe"]
        if r["attack"] is not None:
            t["attack"][i] = r["attack"]
        if r["topic"] is not None:
            t["topic"][i] = r["topic"]
        for c in r["cats"]:
            t["cats"][i, CATEGORY_CODES.index(c)] = 1.0
    return t


def loss_fn(logits: Any, batch: dict[str, Any]) -> Any:
    import torch.nn.functional as F  # noqa: N812

    w = batch["weight"]
    total = logits.new_zeros(())
    for col, key in ((UNSAFE_COL, "unsafe"), (ATTACK_COL, "attack")):
        y = batch[key]
        m = (y >= 0).to(logits.dtype) * w
        bce = F.binary_cross_entropy_with_logits(logits[:, col], y.clamp(min=0), reduction="none")
        total = total + (bce * m).sum() / m.sum().clamp(min=1.0)
    harmful = (batch["unsafe"] == 1).to(logits.dtype) * w
    cat_bce = F.binary_cross_entropy_with_logits(logits[:, CATS], batch["cats"], reduction="none").mean(dim=1)
    total = total + 0.5 * (cat_bce * harmful).sum() / harmful.sum().clamp(min=1.0)
    topic = batch["topic"]
    has_topic = topic >= 0
    if bool(has_topic.any()):
        ce = F.cross_entropy(logits[has_topic][:, TOPICS], topic[has_topic], reduction="none")
        total = total + (ce * w[has_topic]).sum() / w[has_topic].sum()
    return total


def _batches(features: list[Any], order: list[int], targets: dict[str, np.ndarray], weights: np.ndarray,
             device: str) -> Any:
    """Batches of the bottom layers' outputs (right-padded with zeros) and their targets."""
    import torch

    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        width = max(features[i].shape[0] for i in rows)
        hidden = torch.zeros((len(rows), width, features[rows[0]].shape[1]), device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for k, i in enumerate(rows):
            hidden[k, : features[i].shape[0]] = features[i]
            mask[k, : features[i].shape[0]] = 1
        yield {
            "hidden": hidden,
            "attention_mask": mask,
            "unsafe": torch.from_numpy(targets["unsafe"][rows]).float().to(device),
            "attack": torch.from_numpy(targets["attack"][rows]).float().to(device),
            "topic": torch.from_numpy(targets["topic"][rows]).long().to(device),
            "cats": torch.from_numpy(targets["cats"][rows]).float().to(device),
            "weight": torch.from_numpy(weights[rows]).float().to(device),
        }


def bottom_features(net: Any, ids: list[list[int]], device: str, batch: int = 64) -> list[Any]:
    """Each row's output of the frozen bottom layers, computed once (no dropout there: they never train), so
    an epoch runs only the top layers: ~3x faster on a CPU."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Any] = [None] * len(ids)
    net.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            input_ids, mask = pad_batch([ids[i] for i in rows])
            hidden = net.bottom(torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device))
            for k, i in enumerate(rows):
                out[i] = hidden[k, : len(ids[i])].clone()
    return out


def _length_bucketed(ids: list[list[int]], rng: random.Random) -> list[int]:
    """Shuffled order in which a batch holds texts of similar length (little padding), batches shuffled too."""
    order = list(range(len(ids)))
    rng.shuffle(order)
    chunks = [sorted(order[i : i + BATCH * 50], key=lambda k: len(ids[k])) for i in range(0, len(order), BATCH * 50)]
    batches = [c[i : i + BATCH] for c in chunks for i in range(0, len(c), BATCH)]
    rng.shuffle(batches)
    return [k for b in batches for k in b]


def fit(rows: list[dict[str, Any]], base_dir: Path, *, seed: int = 1234, epochs: int = EPOCHS,
        device: str | None = None, log: Any = print) -> tuple[Any, dict[str, Any]]:
    """Trains on the rows of split "train"; returns the network (eval mode, on CPU) and a run summary."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    train_rows = [r for r in rows if r["split"] == "train"]
    tokenizer = load_tokenizer(base_dir / TOKENIZER_FILE)
    ids = encode_ids(tokenizer, [r["text"] for r in train_rows])
    net = build_network(base_dir).to(device)
    for name, param in net.named_parameters():
        param.requires_grad_(is_trained(name))
    started = time.perf_counter()
    # As the fit converges, Adam's moments and some activations become denormal floats, which x86 CPUs compute
    # many times slower (epochs slowed down 4x). Flushed to zero during the fit only: it is process-wide.
    torch.set_flush_denormal(True)
    try:
        features = bottom_features(net, ids, device)
        labels = (_targets(train_rows), source_weights(train_rows, BALANCE))
        _train(net, features, ids, labels, epochs, seed, device, log)
    finally:
        torch.set_flush_denormal(False)
    net.eval().to("cpu")
    summary = {"device": device, "train_rows": len(train_rows), "epochs": epochs, "batch": BATCH,
               "frozen_layers": FROZEN_LAYERS, "balance": BALANCE, "lr_encoder": LR_ENCODER, "lr_head": LR_HEAD,
               "seed": seed,
               "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__}
    return net, summary


def _train(net: Any, features: list[Any], ids: list[list[int]], labels: tuple[dict[str, np.ndarray], np.ndarray],
           epochs: int, seed: int, device: str, log: Any) -> None:
    """AdamW on the top layers and the head, warm-up then linear decay, length-bucketed batches."""
    import torch

    targets, weights = labels
    head_params = list(net.head.parameters())
    encoder_params = [p for p in net.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": LR_ENCODER},
                                   {"params": head_params, "lr": LR_HEAD}], weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(ids) / BATCH)
    warmup = max(1, int(WARMUP * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    rng = random.Random(seed)
    started = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for batch in _batches(features, _length_bucketed(ids, rng), targets, weights, device):
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = net.top(batch["hidden"], batch["attention_mask"])
            loss = loss_fn(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder_params + head_params, 1.0)
            optimizer.step()
            scheduler.step()
            total, n = total + float(loss.detach()), n + 1
        log(f"epoch {epoch + 1}/{epochs}: loss {total / max(1, n):.4f} ({time.perf_counter() - started:.0f} s)")


def predict(net: Any, base_dir: Path, texts: list[str], batch: int = 64) -> np.ndarray:
    """The network's logits in fp32 on CPU (to compare with the exported model)."""
    import torch

    tokenizer = load_tokenizer(base_dir / TOKENIZER_FILE)
    ids = encode_ids(tokenizer, texts)
    out = np.zeros((len(texts), N_OUTPUTS), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            input_ids, mask = pad_batch(ids[start : start + batch])
            out[start : start + batch] = net(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
    return out


def save_weights(net: Any, out_dir: Path, dtype: str = "float16") -> list[Path]:
    """The trained parameters (`is_trained`: the rest are the base model's) as safetensors shards under
    SHARD_BYTES."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous()
             for k, v in net.state_dict().items() if is_trained(k)}
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    paths = []
    for i, shard in enumerate(shards):
        path = out_dir / f"guard-weights-{i}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
    return paths


def load_weights(base_dir: Path, weight_files: list[Path]) -> Any:
    """The network from the base model plus the trained shards."""
    from safetensors.torch import load_file

    net = build_network(base_dir)
    state = {}
    for path in weight_files:
        state.update({k: v.float() for k, v in load_file(str(path)).items()})
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(is_trained(k) for k in missing):
        raise ValueError(f"guard weights do not match the network: missing {missing}, unexpected {unexpected}")
    return net.eval()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Fine-tune the guard from a rows file (training/finetune_data.py)")
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True, help="the all-MiniLM-L6-v2 directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    # split("\n"), not splitlines(): texts may hold U+2028, which splitlines() treats as a line break
    rows = [json.loads(line) for line in args.rows.read_text(encoding="utf-8").split("\n") if line]
    net, summary = fit(rows, args.base, seed=args.seed, epochs=args.epochs)
    save_weights(net, args.out)
    (args.out / "fit.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
