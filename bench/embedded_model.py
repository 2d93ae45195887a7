"""Benchmark 4 — embedded model: prompt and decode tokens/s and time to first token for a typical RAG
prompt (the shipped system prompt, 4 numbered sources from knowledge/, one question), per embedded model,
served by the project's own EmbeddedLLMServer (xllamacpp on loopback, all cores).

    .venv/bin/python -m bench.embedded_model                         # all three models
    .venv/bin/python -m bench.embedded_model --models smollm2-135m --requests 1 --max-tokens 8   # smoke

The first request of a model is "cold" (no prompt cache); later ones reuse the cached system-prompt
prefix the way production turns do (a stable prefix is why the prompt puts the sources after it).
Tokens/s come from llama.cpp's own `timings` in the last streamed chunk; TTFT is measured by the client.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.common import PROJECT_ROOT, RESULTS_DIR, apply_quick, print_table, summarize, write_result
from bench.loadgen import QUESTIONS

MODELS = ["qwen2.5-1.5b", "qwen2.5-0.5b", "smollm2-135m"]


def rag_messages(question: str, rotate: int) -> list[dict[str, str]]:
    from app.rag.chain import build_messages
    from app.rag.chunking import chunk_document, record_to_chunk
    from app.rag.loaders import load_document

    raw = yaml.safe_load((PROJECT_ROOT / "rails" / "config.yml").read_text())
    system = "\n".join(str(i.get("content", "")).strip() for i in raw.get("instructions", []))
    records = []
    for name in ("atm-network.md", "card-activation-and-pin.md"):
        path = PROJECT_ROOT / "knowledge" / name
        records += chunk_document(load_document(path), path.stem, name, chunk_chars=900, overlap=120)
    chunks = [record_to_chunk(r, 0.6) for r in records]
    chunks = (chunks[rotate:] + chunks[:rotate])[:4]
    prepared = build_messages(question, [], chunks, system_prompt=system, context_tokens=1500)
    return list(prepared.messages)


def one_request(url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0.0}
    started = time.perf_counter()
    first: float | None = None
    timings: dict[str, Any] = {}
    with httpx.Client(timeout=600) as client, client.stream("POST", url + "/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            delta = (data.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content") and first is None:
                first = time.perf_counter()
            timings = data.get("timings") or timings
    total = time.perf_counter() - started
    return {
        "ttft_ms": round(((first or time.perf_counter()) - started) * 1000, 1),
        "total_ms": round(total * 1000, 1),
        "prompt_tokens": timings.get("prompt_n"),
        "cached_tokens": timings.get("cache_n"),
        "prompt_tok_s": round(float(timings.get("prompt_per_second") or 0), 1),
        "decode_tokens": timings.get("predicted_n"),
        "decode_tok_s": round(float(timings.get("predicted_per_second") or 0), 1),
    }


def bench_model(name: str, requests: int, max_tokens: int) -> dict[str, Any]:
    from app.llm.embedded import EmbeddedLLMServer
    from app.llm.models import fetch_model

    path = fetch_model(name, PROJECT_ROOT / "data" / "models", progress=False)
    runs = []
    with EmbeddedLLMServer(path, model_name=name, ctx_size=4096, threads=0, parallel=1) as server:
        for i in range(requests):
            run = one_request(server.base_url, name, rag_messages(QUESTIONS[i % len(QUESTIONS)], i), max_tokens)
            run["cold"] = i == 0
            runs.append(run)
            print(f"{name}: {run}", flush=True)
        threads = server.threads
    warm = [r for r in runs if not r["cold"]] or runs
    return {"model": name, "file_mb": round(path.stat().st_size / 2**20), "threads": threads, "runs": runs,
            "cold_ttft_ms": runs[0]["ttft_ms"], "cold_prompt_tok_s": runs[0]["prompt_tok_s"],
            "warm_ttft_ms": summarize([r["ttft_ms"] for r in warm])["p50"],
            "decode_tok_s": summarize([r["decode_tok_s"] for r in runs])["p50"],
            "prompt_tokens": runs[0]["prompt_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.quick:
        apply_quick(args, parser, models=["smollm2-135m"], requests=2, max_tokens=8)
    results = [bench_model(m, args.requests, args.max_tokens) for m in args.models]
    table = print_table(
        ["model", "GGUF MB", "prompt tokens", "cold TTFT ms", "prompt tok/s (cold)", "warm TTFT ms", "decode tok/s"],
        [[r["model"], r["file_mb"], r["prompt_tokens"], r["cold_ttft_ms"], r["cold_prompt_tok_s"], r["warm_ttft_ms"],
          r["decode_tok_s"]] for r in results], "Embedded model, typical RAG prompt")
    write_result("embedded_model", {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "results": results, "table": table}, args.results_dir)


if __name__ == "__main__":
    main()
