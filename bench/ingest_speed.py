"""Why ingestion embeds only ~20 chunks/s, and what each candidate fix gives (prototypes, measured).

    .venv/bin/python -m bench.ingest_speed

Embeds the shipped knowledge base's real chunks (900 chars, title + section prefix: what app.rag.ingest
embeds) with the bundled MiniLM under several settings and reports chunks/s and the tokens per chunk,
plus the cosine agreement of every variant's vectors with the shipped (fp32, 256-token) ones — a fix that
changes the vectors changes retrieval, so it must stay close (or the index must be rebuilt with it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import PROJECT_ROOT, RESULTS_DIR, print_table, write_result


def real_chunk_texts() -> list[str]:
    from app.rag.chunking import chunk_document, search_text
    from app.rag.loaders import load_document

    texts: list[str] = []
    for path in sorted((PROJECT_ROOT / "knowledge").glob("*.md")):
        if path.stem.lower() == "readme":
            continue
        texts += [search_text(r) for r in chunk_document(load_document(path), path.stem, path.name,
                                                         chunk_chars=900, overlap=120)]
    return texts


def timed_encode(model: Any, texts: list[str], batch_size: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    model.encode(texts[:batch_size], batch_size=batch_size, normalize_embeddings=True)  # warm
    best = float("inf")
    vecs = np.zeros(0)
    for _ in range(repeats):
        started = time.perf_counter()
        vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        best = min(best, time.perf_counter() - started)
    return len(texts) / best, np.asarray(vecs, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from app.rag.embedder import bundled_model_path

    texts = real_chunk_texts()
    model = SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True)
    lengths = [len(ids) for ids in model.tokenizer(texts, truncation=False)["input_ids"]]
    tokens = {"chunks": len(texts), "mean_chars": round(float(np.mean([len(t) for t in texts]))),
              "mean_tokens": round(float(np.mean(lengths))), "max_tokens": max(lengths),
              "over_256": sum(n > 256 for n in lengths), "over_128": sum(n > 128 for n in lengths)}
    print(tokens, "torch threads:", torch.get_num_threads(), flush=True)

    rows: list[list[Any]] = []
    results: dict[str, Any] = {"tokens": tokens, "torch_threads": torch.get_num_threads()}

    def record(label: str, per_s: float, vecs: np.ndarray, reference: np.ndarray | None) -> None:
        agree = float(np.min(np.sum(vecs * reference, axis=1))) if reference is not None else 1.0
        rows.append([label, round(per_s, 1), round(agree, 4)])
        results[label] = {"chunks_per_s": round(per_s, 1), "min_cosine_vs_shipped": round(agree, 4)}
        print(rows[-1], flush=True)

    base_rate, reference = timed_encode(model, texts, 64)
    record("shipped: fp32, max_seq 256, batch 64, 2 threads", base_rate, reference, None)
    for bs in (8, 16):
        rate, vecs = timed_encode(model, texts, bs)
        record(f"batch {bs}", rate, vecs, reference)
    torch.set_num_threads(1)
    rate, vecs = timed_encode(model, texts, 64)
    record("1 torch thread (how much 2 threads scale)", rate, vecs, reference)
    torch.set_num_threads(2)
    model.max_seq_length = 128
    rate, vecs = timed_encode(model, texts, 64)
    record("max_seq_length 128 (truncates; MiniLM was trained at 128)", rate, vecs, reference)
    model.max_seq_length = 256
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    rate, vecs = timed_encode(quantized, texts, 64)
    record("int8 dynamic quantization (torch quantize_dynamic)", rate, vecs, reference)
    quantized.max_seq_length = 128
    rate, vecs = timed_encode(quantized, texts, 64)
    record("int8 + max_seq_length 128", rate, vecs, reference)

    table = print_table(["variant", "chunks/s", "min cosine vs shipped"], rows,
                        f"MiniLM ingestion embedding, {len(texts)} real 900-char chunks")
    write_result("ingest_speed", {**results, "table": table}, args.results_dir)


if __name__ == "__main__":
    main()
