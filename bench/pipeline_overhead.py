"""Benchmark 1 — pipeline overhead: full guarded RAG turns over HTTP against instant backends.

    .venv/bin/python -m bench.pipeline_overhead            # full run (~10 min on 2 cores)
    .venv/bin/python -m bench.pipeline_overhead --quick    # smoke run

Setups, in the same run and on the same fake backends (bench/fake_backends.py, separate processes):
- backend alone (the floor: the load generator straight at the fake chat LLM);
- guardchat: Redis sessions, the shipped rails/ (Llama Guard over HTTP in and out, attack, topic,
  groundedness, retrieval rail), FAISS + BM25 over ~10k synthetic chunks (query embeddings micro-batched
  under load: app/rag/batching.py);
- `nemoguardrails server`, LLMRails and IORails, with 4 equivalent rails (bench/nemo_configs/four_rails).
Each at concurrency 1 and 32, closed loop (bench/loadgen.py in its own process), non-streaming.

Model time of a guardchat turn = `timings_ms.model`: the part of the turn's wall time in which it waited on a
model (the chat LLM request, the Llama Guard requests, the one query embedding), measured by the server from
each call's start and end, with overlapping calls counted once (app/observability/model_time.py). The
overhead is the client's latency minus that: HTTP, FastAPI, sessions, rails, retrieval, prompt, and the
load generator's own request handling (the floor row shows what that costs alone).
(Sessions 1-5 subtracted the embedding plus both Llama Guard calls' latencies instead, and not the LLM call:
that overstated model time where the input check overlapped the embedding, and understated it by the LLM
request.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench import profiling
from bench.common import RESULTS_DIR, apply_quick, print_table, summarize, write_result
from bench.corpus import build_corpus
from bench.fake_backends import ANSWER
from bench.loadgen import LoadResult, Sample
from bench.stack import NEMO_CONFIG_ID, guardchat_env, run_loadgen, start_backends, start_guardchat, start_nemo

TARGETS = {"p1_total_p50_ms": 15.0, "p1_overhead_p50_ms": 3.0, "p1_overhead_p99_ms": 8.0,
           "p3_turns_per_s": 250.0, "p3_p99_ms": 250.0}


def model_ms(sample: Sample) -> float:
    return float(sample.timings.get("model", 0.0))


def _answered(sample: Sample) -> bool:
    """The fake LLM's answer came through: its fixed ANSWER, or (`--answer grounded`) a restated source that
    guardchat found cited."""
    return sample.answer_chars == len(ANSWER) or (sample.citations > 0 and not sample.blocked)


def summarize_load(result: LoadResult) -> dict[str, Any]:
    ok = result.ok
    latencies = [s.latency_ms for s in ok]
    row: dict[str, Any] = {
        "concurrency": result.concurrency,
        "latency_ms": summarize(latencies),
        "turns_per_s": round(len(ok) / result.duration_s, 1) if result.duration_s else 0.0,
        "requests": len(result.samples),
        "errors": len(result.errors),
        "answered_by_llm": round(sum(_answered(s) for s in ok) / len(ok), 3) if ok else 0.0,
    }
    if result.server_cpu_s is not None and ok:
        row["server_cpu_ms_per_turn"] = round(1000 * result.server_cpu_s / len(ok), 2)
    if result.kind == "guardchat" and ok:
        row["blocked"] = sum(s.blocked for s in ok)
        row["model_ms"] = summarize([model_ms(s) for s in ok])
        row["overhead_ms"] = summarize([s.latency_ms - model_ms(s) for s in ok])
        stages = sorted({k for s in ok for k in s.timings})
        row["stages_p50_ms"] = {k: summarize([s.timings[k] for s in ok if k in s.timings])["p50"] for k in stages}
        names = sorted({r["name"] for s in ok for r in s.rails})
        row["rails_p50_ms"] = {
            n: summarize([float(r["latency_ms"] or 0) for s in ok for r in s.rails if r["name"] == n])["p50"]
            for n in names
        }
    return row


def check_targets(c1: dict[str, Any] | None, c32: dict[str, Any] | None) -> list[str]:
    lines = []

    def verdict(name: str, value: float, target: float, higher_is_better: bool = False) -> None:
        met = value >= target if higher_is_better else value <= target
        gap = (target - value) if higher_is_better else (value - target)
        lines.append(f"{name}: {value:.1f} vs target {'>=' if higher_is_better else '<='} {target:g} -> "
                     + ("MET" if met else f"MISSED by {gap:.1f} ({100 * gap / target:.0f}%)"))

    if c1:
        verdict("P1 c=1 total p50 ms", c1["latency_ms"]["p50"], TARGETS["p1_total_p50_ms"])
        verdict("P1 c=1 overhead p50 ms", c1["overhead_ms"]["p50"], TARGETS["p1_overhead_p50_ms"])
        verdict("P1 c=1 overhead p99 ms", c1["overhead_ms"]["p99"], TARGETS["p1_overhead_p99_ms"])
    if c32:
        verdict("P3 c=32 turns/s", c32["turns_per_s"], TARGETS["p3_turns_per_s"], higher_is_better=True)
        verdict("P3 c=32 p99 ms", c32["latency_ms"]["p99"], TARGETS["p3_p99_ms"])
        lines.append(f"P3 c=32 errors: {c32['errors']} (target 0) -> {'MET' if c32['errors'] == 0 else 'MISSED'}")
    for line in lines:
        print(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="guardchat pipeline overhead vs NeMo Guardrails server")
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per setup and concurrency")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--variants", default="plain", help="guardchat variants (only `plain`: the app always batches)")
    parser.add_argument("--skip-nemo", action="store_true")
    parser.add_argument("--answer", choices=["fixed", "grounded"], default="fixed",
                        help="the fake LLM's answer: fixed (about card disputes whatever the question: the "
                             "groundedness rail's worst case) or grounded (restates the prompt's source [1])")
    parser.add_argument("--workers", type=int, default=1, help="guardchat uvicorn worker processes")
    parser.add_argument("--profile", action="store_true", help="py-spy record guardchat at the highest concurrency")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--quick", action="store_true", help="tiny corpus and short runs (smoke test)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.quick:
        apply_quick(args, parser, chunks=300, duration=2.0, warmup=1.0, concurrency=[1, 4])

    corpus = build_corpus(args.chunks)
    print(f"corpus: {corpus['chunks']} chunks ({corpus['index_kind']}) in {corpus['data_dir']}", flush=True)
    setups: dict[str, dict[int, dict[str, Any]]] = {}
    profile_report: dict[str, Any] = {}
    backends = start_backends(grounded=args.answer == "grounded")
    try:
        setups["backend alone (floor)"] = {
            c: summarize_load(run_loadgen(backends.llm.url, "backend", c, args.duration, args.warmup,
                                          cpu_pid=backends.llm.proc.pid))
            for c in args.concurrency
        }
        for variant in [v for v in args.variants.split(",") if v]:
            name = "guardchat"
            server = start_guardchat(
                guardchat_env(backends, corpus, args.redis_url), workers=args.workers
            )
            try:
                setups[name] = {}
                for c in args.concurrency:
                    recorder = None
                    raw = args.results_dir / f"profile-{variant}-c{c}.txt"
                    if args.profile and c == max(args.concurrency):
                        recorder = profiling.start_recording(server.proc.pid, args.duration + args.warmup, raw)
                    setups[name][c] = summarize_load(run_loadgen(server.url, "guardchat", c, args.duration,
                                                                 args.warmup, cpu_pid=server.proc.pid))
                    if recorder is not None:
                        recorder.wait(timeout=120)
                        if raw.exists():
                            profile_report[f"{name} c={c}"] = profiling.hot_spots(raw)
            finally:
                server.stop()
        if not args.skip_nemo:
            for label, iorails in (("nemoguardrails server, LLMRails, 4 rails", False),
                                   ("nemoguardrails server, IORails, 4 rails", True)):
                nemo, workdir = start_nemo(backends, iorails=iorails)
                try:
                    setups[label] = {
                        c: summarize_load(run_loadgen(nemo.url, "nemo", c, args.duration, args.warmup,
                                                      config_id=NEMO_CONFIG_ID, cpu_pid=nemo.proc.pid))
                        for c in args.concurrency
                    }
                finally:
                    nemo.stop()
                    shutil.rmtree(workdir, ignore_errors=True)
    finally:
        backends.stop()

    report(setups, profile_report, corpus, args)


def report(setups: dict[str, dict[int, dict[str, Any]]], profile_report: dict[str, Any], corpus: dict[str, Any],
           args: argparse.Namespace) -> None:
    lo, hi = min(args.concurrency), max(args.concurrency)
    rows = []
    for name, by_c in setups.items():
        a, b = by_c.get(lo), by_c.get(hi)
        rows.append([name, a["latency_ms"]["p50"] if a else "-", a["latency_ms"]["p99"] if a else "-",
                     b["turns_per_s"] if b else "-", b["latency_ms"]["p50"] if b else "-",
                     b["latency_ms"]["p99"] if b else "-", sum(x["errors"] for x in by_c.values()),
                     min(x["answered_by_llm"] for x in by_c.values()),
                     a.get("server_cpu_ms_per_turn", "-") if a else "-",
                     b.get("server_cpu_ms_per_turn", "-") if b else "-"])
    headers = ["setup", f"c={lo} p50 ms", f"c={lo} p99 ms", f"c={hi} turns/s", f"c={hi} p50 ms",
               f"c={hi} p99 ms", "errors", "answered by LLM", f"server CPU ms/turn c={lo}", f"c={hi}"]
    tables = [print_table(headers, rows, f"Full turns over HTTP, instant backends, {corpus['chunks']} chunks")]
    target_lines: dict[str, list[str]] = {}
    for name, by_c in setups.items():
        if not name.startswith("guardchat"):
            continue
        split_rows = [[c, r["latency_ms"]["p50"], r["model_ms"]["p50"], r["overhead_ms"]["p50"],
                       r["overhead_ms"]["p99"]] for c, r in sorted(by_c.items()) if "model_ms" in r]
        tables.append(print_table(["concurrency", "total p50", "model p50", "overhead p50", "overhead p99"],
                                  split_rows, f"{name}: model time vs everything else (ms)"))
        stage_rows = [[k, *(by_c[c]["stages_p50_ms"].get(k, "-") for c in sorted(by_c))]
                      for k in by_c[lo].get("stages_p50_ms", {})]
        stage_rows += [[f"rail {k}", *(by_c[c]["rails_p50_ms"].get(k, "-") for c in sorted(by_c))]
                       for k in by_c[lo].get("rails_p50_ms", {})]
        tables.append(print_table(["stage (p50 ms)", *(f"c={c}" for c in sorted(by_c))], stage_rows,
                                  f"{name}: guardchat.timings_ms"))
        print(f"\n{name}:")
        target_lines[name] = check_targets(by_c.get(1), by_c.get(32))
    for key, spots in profile_report.items():
        tables.append(print_table(["function (self time)", "% samples"], spots["self"][:15], f"py-spy {key}"))
    write_result("pipeline_overhead", {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": corpus, "setups": {k: {str(c): v for c, v in by_c.items()} for k, by_c in setups.items()},
        "targets": target_lines, "profile": profile_report, "tables": tables,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, args.results_dir)


if __name__ == "__main__":
    main()
