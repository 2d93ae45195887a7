"""Retrieval on a GPU: ingestion chunks/s with MiniLM on CUDA, query-embedding latency, and top-10 search latency
at 1M chunks. Two steps, because the GPU machine can fetch nothing and takes at most 64 MiB of files:

    # here: the bundled MiniLM, its weight matrices as int8 rows (+ fp16 scales, ~23 MB instead of 90 MB fp32),
    # the knowledge base's real chunk texts, and reference vectors from the CPU in fp32
    .venv/bin/python -m bench.gpu_retrieval pack --out data/gpu-embedder
    # there (carry data/gpu-embedder): expand to fp16, embed on CUDA through app.rag.embedder.MiniLMEmbedder
    PYTHONPATH=$PWD python3 -m bench.gpu_retrieval run --model data/gpu-embedder --out $OUT/gpu_retrieval.json

The int8 packing only shrinks what travels: the GPU runs a full fp16 MiniLM (same shapes, so the same speed),
and the reference vectors are computed here from the same dequantized weights in fp32, so the GPU-vs-CPU
cosine measures the GPU's precision alone (`pack` reports the packing's own cosine to the original weights).
Search: FAISS on the GPU (app.rag.gpu_index: exact, and IVF with its recall check) if the machine's faiss has
GPU support; else exact search as a torch matmul + top-k on the GPU (what GpuIndexFlatIP computes), said so.
The previous code's path is measured in the same run: MiniLM in fp32 on that machine's CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILES = [
    "config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "1_Pooling/config.json",
]
QUERIES = ["How do I dispute a card transaction?", "what does a domestic wire cost", "lock my debit card",
           "Is there a fee for a replacement card sent by express mail?", "how long do ACH transfers take",
           "Error QX-7731 when depositing a check", "open a joint savings account", "overdraft fee refund"]
WEIGHTS, SCALES = "weights-int8.safetensors", "scales.safetensors"


def pack(out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from app.rag.embedder import MiniLMEmbedder, bundled_model_path

    source = Path(bundled_model_path())
    out.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, out / name)
    original = load_file(str(source / "model.safetensors"))
    quantized, scales = {}, {}
    for name, tensor in original.items():
        if tensor.ndim == 2:  # per-row absmax int8: the GPU expands it back to fp16
            scale = tensor.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            quantized[name] = torch.round(tensor / scale).to(torch.int8)
            scales[name] = scale.to(torch.float16)
        else:
            quantized[name] = tensor.to(torch.float16)
    save_file(quantized, str(out / WEIGHTS))
    save_file(scales, str(out / SCALES))
    expanded = out.parent / (out.name + "-fp32")  # the CPU reference uses exactly what the GPU will run
    _expand(out, expanded, torch.float32)
    texts = _chunk_texts()
    probe = QUERIES + texts[:: max(1, len(texts) // 200)][:200]
    reference = MiniLMEmbedder(str(expanded), device="cpu", precision="float32").embed(probe)
    exact = MiniLMEmbedder(str(source), device="cpu", precision="float32").embed(probe)
    (out / "chunks.json").write_text(json.dumps(texts), encoding="utf-8")
    np.savez_compressed(out / "reference.npz", texts=np.array(probe), vectors=reference)
    packing_cosine = (reference * exact).sum(axis=1)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"packed {len(texts)} chunks; int8 packing vs original weights: cosine min {packing_cosine.min():.5f} "
          f"mean {packing_cosine.mean():.5f}; {size_mb:.1f} MB")
    shutil.rmtree(expanded)


def _chunk_texts() -> list[str]:
    """The knowledge base as `guardchat ingest` chunks it: what each chunk's vector is computed from."""
    from app.rag.chunking import chunk_document, search_text
    from app.rag.ingest import discover_files
    from app.rag.loaders import load_document
    from app.settings import get_settings

    settings = get_settings()
    texts = []
    for path in discover_files(settings.knowledge_dir):
        records = chunk_document(load_document(path), path.stem, path.name, chunk_chars=settings.rag_chunk_chars,
                                 overlap=settings.rag_chunk_overlap)
        texts += [search_text(r) for r in records]
    return texts


def _expand(packed: Path, target: Path, dtype: Any) -> None:
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(packed / name, target / name)
    weights, scales = load_file(str(packed / WEIGHTS)), load_file(str(packed / SCALES))
    full = {n: (w.float() * scales[n].float() if n in scales else w.float()).to(dtype) for n, w in weights.items()}
    save_file(full, str(target / "model.safetensors"))


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {"p50_ms": round(statistics.median(ordered), 3), "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
            "n": len(ordered)}


def _ingest_rate(embedder: Any, texts: list[str], batch: int, rounds: int = 3) -> float:
    """chunks/s of app/rag/ingest.py's embed_batched loop (length-sorted batches of `batch`), best of `rounds`."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for start in range(0, len(order), batch):
            embedder.embed([texts[i] for i in order[start : start + batch]])
        best = max(best, len(texts) / (time.perf_counter() - started))
    return round(best, 1)


def _query_latency(embedder: Any, n: int = 300) -> dict[str, float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        embedder.embed([QUERIES[i % len(QUERIES)]])
        samples.append((time.perf_counter() - started) * 1e3)
    return _percentiles(samples[20:])


def run(model: Path, out: Path, *, smoke: bool = False) -> dict[str, Any]:
    """`smoke`: a small CPU-only pass of the same code, to check the script before spending GPU time."""
    import torch

    from app.rag.embedder import CUDA_BULK_BATCH, MiniLMEmbedder, Precision, select_device

    device = select_device("auto")
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                              "torch": torch.__version__, "cpu": _cpu_model(), "cores": torch.get_num_threads(),
                              "device": device}
    if device != "cuda" and not smoke:
        raise SystemExit(f"no CUDA device here ({result}); use --smoke for a CPU check of the script")
    expanded = Path("/tmp/minilm-fp16")
    _expand(model, expanded, torch.float16)
    texts = json.loads((model / "chunks.json").read_text(encoding="utf-8"))
    corpus = [texts[i % len(texts)] for i in range(300 if smoke else 20_000)]
    reference = np.load(model / "reference.npz")
    precisions: tuple[Precision, ...] = ("float32",) if smoke else ("float16", "float32")
    for precision in precisions:
        embedder = MiniLMEmbedder(str(expanded), device=device, precision=precision)
        embedder.embed(corpus[:2048])  # warm-up: CUDA context, kernels, allocator
        cosine = (embedder.embed(list(reference["texts"])) * reference["vectors"]).sum(axis=1)
        batches = (8, 32) if smoke else (128, CUDA_BULK_BATCH, 1024)
        result[f"cuda_{precision}"] = {
            "ingest_chunks_per_s": {b: _ingest_rate(embedder, corpus, b, rounds=1 if smoke else 3) for b in batches},
            "query_embed": _query_latency(embedder, 40 if smoke else 300),
            "cosine_to_cpu_fp32": {"min": round(float(cosine.min()), 6), "mean": round(float(cosine.mean()), 6)},
        }
        print(precision, json.dumps(result[f"cuda_{precision}"]), flush=True)
    cpu = MiniLMEmbedder(str(expanded), device="cpu", precision="float32")  # the previous code's path
    result["cpu_fp32_previous_path"] = {"ingest_chunks_per_s": _ingest_rate(cpu, corpus[:1000], 8, rounds=1),
                                        "query_embed": _query_latency(cpu, 60)}
    print("cpu", json.dumps(result["cpu_fp32_previous_path"]), flush=True)
    seed_vectors = MiniLMEmbedder(str(expanded), device=device).embed(texts)
    result["search"] = _search_bench(seed_vectors, 20_000 if smoke else 1_000_000, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result["search"], indent=1))
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _corpus_vectors(seed_vectors: np.ndarray, n: int) -> np.ndarray:
    """`n` unit vectors around the real chunk embeddings (each a real chunk's vector plus noise of about the
    spread between neighbouring chunks), so neighbourhoods look like a large knowledge base's."""
    rng = np.random.default_rng(0)
    base = seed_vectors[rng.integers(0, len(seed_vectors), n)]
    vectors = base + 0.08 * rng.standard_normal(base.shape, dtype=np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _search_bench(seed_vectors: np.ndarray, n: int, device: str) -> dict[str, Any]:
    vectors = _corpus_vectors(seed_vectors, n)
    queries = _corpus_vectors(seed_vectors, 300)
    try:
        import faiss
    except ImportError as exc:
        return {"faiss": f"not importable ({exc}): exact search as torch matmul + top-k on the GPU",
                "vectors": n, "torch_exact": _torch_search(vectors, queries, device)}
    report: dict[str, Any] = {"faiss": faiss.__version__, "gpus": faiss.get_num_gpus(), "vectors": n}
    if faiss.get_num_gpus() < 1:
        report["torch_exact"] = _torch_search(vectors, queries, device)
        return report
    from app.rag.gpu_index import _gpu_ivf_or_exact, maybe_to_gpu

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    started = time.perf_counter()
    exact = maybe_to_gpu(flat, vectors)  # the server's path: up to 2M vectors, exact search on the GPU
    report["gpu_flat"] = {"kind": getattr(exact, "kind", "cpu"), "build_s": round(time.perf_counter() - started, 2),
                          **_faiss_latency(exact, queries)}
    started = time.perf_counter()
    ivf = _gpu_ivf_or_exact(faiss.StandardGpuResources(), 0, vectors, exact.index)  # what > 2M vectors get
    report["gpu_index_chosen"] = {"kind": ivf.kind, "build_s": round(time.perf_counter() - started, 2),
                                  "nprobe": getattr(ivf.index, "nprobe", None), **_faiss_latency(ivf, queries)}
    return report


def _faiss_latency(index: Any, queries: np.ndarray) -> dict[str, Any]:
    samples = []
    for q in queries:
        started = time.perf_counter()
        index.search(q.reshape(1, -1), 10)
        samples.append((time.perf_counter() - started) * 1e3)
    started = time.perf_counter()
    index.search(queries[:64], 10)
    return {"single": _percentiles(samples[20:]), "batch64_ms": round((time.perf_counter() - started) * 1e3, 3)}


def _torch_search(vectors: np.ndarray, queries: np.ndarray, device: str) -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {}
    truth = None
    for dtype in (torch.float32, torch.float16) if device == "cuda" else (torch.float32,):
        matrix = torch.from_numpy(vectors).to(device, dtype)
        samples, found = [], []
        for q in queries:
            started = time.perf_counter()
            qt = torch.from_numpy(q).to(device, dtype)
            ids = torch.topk(matrix @ qt, 10).indices.cpu().numpy()  # .cpu() waits for the GPU
            samples.append((time.perf_counter() - started) * 1e3)
            found.append(ids)
        name = str(dtype).removeprefix("torch.")
        report[name] = {"single": _percentiles(samples[20:])}
        if truth is None:
            truth = found
        else:
            hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
            report[name]["recall_at_10_vs_float32"] = round(hits / (10 * len(found)), 4)
        del matrix
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["pack", "run"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("data/gpu-embedder"))
    parser.add_argument("--smoke", action="store_true", help="run: a small CPU pass of the script, no GPU")
    args = parser.parse_args()
    if args.step == "pack":
        pack(args.out)
    else:
        run(args.model, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()
