"""Benchmark 5 — memory: RSS of the guardchat server process (all threads, incl. an in-process llama.cpp).

    .venv/bin/python -m bench.memory --turns 10000      # as many turns as --max-minutes allows
    .venv/bin/python -m bench.memory --quick

Phase A, embedded mode: GUARDCHAT_LLM_BACKEND=embedded with SmolLM2-135M (the smallest shipped model; the
target is "1.5 GB plus the model file", so the model's own size is subtracted), a few real turns.
Phase B, flatness: the same app against the instant fake backends (so thousands of turns fit in minutes),
Redis sessions, closed loop at concurrency 8; RSS sampled after every slice of turns. "Flat" = the RSS of
the last sample is within 5% (and 50 MiB) of the sample taken after the first 20% of the turns (warm-up:
caches, allocator arenas and lazily built objects fill up first).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    PROJECT_ROOT,
    PYTHON,
    RESULTS_DIR,
    apply_quick,
    free_port,
    print_table,
    rss_mb,
    start_child,
    write_result,
)
from bench.corpus import build_corpus
from bench.loadgen import QUESTIONS
from bench.stack import guardchat_env, run_loadgen, start_backends, start_guardchat

P5_LIMIT_MB = 1536.0


def embedded_phase(corpus: dict[str, Any], turns: int) -> dict[str, Any]:
    from app.llm.models import fetch_model

    model_path = fetch_model("smollm2-135m", PROJECT_ROOT / "data" / "models", progress=False)
    model_mb = model_path.stat().st_size / 2**20
    env = {
        "GUARDCHAT_LLM_BACKEND": "embedded", "GUARDCHAT_EMBEDDED_MODEL": "smollm2-135m",
        "GUARDCHAT_EMBEDDED_CTX": "2048", "GUARDCHAT_GUARD_BACKEND": "embedded", "GUARDCHAT_LLM_MAX_TOKENS": "16",
        "GUARDCHAT_DATA_DIR": corpus["data_dir"], "GUARDCHAT_KNOWLEDGE_DIR": corpus["knowledge_dir"],
        "GUARDCHAT_UI_ENABLED": "false", "GUARDCHAT_LLM_TIMEOUT_S": "600",
    }
    port = free_port()
    server = start_child("guardchat-embedded", [PYTHON, "-m", "bench.serve", "--port", str(port)], port, env=env,
                         ready_path="/healthz", timeout=900)
    samples = []
    try:
        samples.append({"turns": 0, "rss_mb": round(rss_mb(server.proc.pid), 1)})
        with httpx.Client(base_url=server.url, timeout=900) as client:
            for i in range(turns):
                body = {"model": "x", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
                client.post("/v1/chat/completions", json=body).raise_for_status()
                samples.append({"turns": i + 1, "rss_mb": round(rss_mb(server.proc.pid), 1)})
    finally:
        server.stop()
    peak = max(s["rss_mb"] for s in samples)
    return {"model": "smollm2-135m", "model_file_mb": round(model_mb, 1), "samples": samples, "peak_rss_mb": peak,
            "peak_minus_model_mb": round(peak - model_mb, 1),
            "p5_verdict": ("MET" if peak - model_mb <= P5_LIMIT_MB else
                           f"MISSED by {peak - model_mb - P5_LIMIT_MB:.0f} MiB")}


def flatness_phase(corpus: dict[str, Any], turns: int, max_minutes: float, redis_url: str) -> dict[str, Any]:
    backends = start_backends()
    server = start_guardchat(guardchat_env(backends, corpus, redis_url))
    samples = [{"turns": 0, "seconds": 0.0, "rss_mb": round(rss_mb(server.proc.pid), 1)}]
    started = time.monotonic()
    done = 0
    errors = 0
    try:
        slice_s = 15.0 if turns > 500 else 2.0
        while done < turns and time.monotonic() - started < max_minutes * 60:
            result = run_loadgen(server.url, "guardchat", 8, slice_s, 0.0)
            done += len(result.ok)
            errors += len(result.errors)
            samples.append({"turns": done, "seconds": round(time.monotonic() - started, 1),
                            "rss_mb": round(rss_mb(server.proc.pid), 1)})
            print(f"{done} turns, RSS {samples[-1]['rss_mb']:.0f} MiB", flush=True)
    finally:
        server.stop()
        backends.stop()
    warm = next((s for s in samples if s["turns"] >= 0.2 * done), samples[-1])
    growth = samples[-1]["rss_mb"] - warm["rss_mb"]
    flat = growth <= max(0.05 * warm["rss_mb"], 50.0)
    return {"turns": done, "errors": errors, "samples": samples, "warm_rss_mb": warm["rss_mb"],
            "final_rss_mb": samples[-1]["rss_mb"], "growth_after_warmup_mb": round(growth, 1),
            "growth_mb_per_1k_turns": round(1000 * growth / max(1, done - warm["turns"]), 2),
            "flat": flat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--embedded-turns", type=int, default=3, help="0 skips the embedded-mode phase")
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.quick:
        apply_quick(args, parser, turns=20, max_minutes=1.0, embedded_turns=0, chunks=300)
    corpus = build_corpus(args.chunks)
    embedded = embedded_phase(corpus, args.embedded_turns) if args.embedded_turns else None
    flat = flatness_phase(corpus, args.turns, args.max_minutes, args.redis_url)
    rows = [["instant backends", flat["turns"], flat["warm_rss_mb"], flat["final_rss_mb"],
             flat["growth_mb_per_1k_turns"], "flat" if flat["flat"] else "GROWING"]]
    table = print_table(["phase", "turns", "RSS after warm-up MiB", "final RSS MiB", "MiB / 1k turns", "verdict"],
                        rows, "guardchat server RSS over many turns")
    if embedded:
        table += print_table(["model", "model file MiB", "peak RSS MiB", "peak - model MiB", "P5 (<= 1536 MiB)"],
                             [[embedded["model"], embedded["model_file_mb"], embedded["peak_rss_mb"],
                               embedded["peak_minus_model_mb"], embedded["p5_verdict"]]], "Embedded mode")
    write_result("memory", {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                            "embedded": embedded, "flatness": flat, "table": table}, args.results_dir)


if __name__ == "__main__":
    main()
