"""Benchmark 2 — streaming: time to first token through guardchat minus the backend's own, and the
delay/jitter the output-rail hold-back adds to the tokens.

    .venv/bin/python -m bench.streaming_ttft            # backend TTFT 200 ms, 20 ms between tokens
    .venv/bin/python -m bench.streaming_ttft --quick

The fake chat LLM streams a ~720-char answer (4 output-rail windows at the default 200 chars) word by
word; Llama Guard answers instantly. Per request we record when each character reached the client and
compare it with when the backend emitted it (request start + TTFT + token index × inter-token delay).
Variants: the shipped hold-back window (GUARDCHAT_OUTPUT_RAILS_CHUNK_CHARS=200) and smaller ones.
P2 budget per request = embed + max(input rails, retrieve) + 5 ms, from the turn's own `timings_ms`: the one
query embedding is a prerequisite of both the input rails and retrieval, so it belongs to both branches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS_DIR, apply_quick, print_table, summarize, write_result
from bench.corpus import build_corpus
from bench.fake_backends import reply_for, tokens_of
from bench.loadgen import QUESTIONS
from bench.stack import guardchat_env, start_backends, start_guardchat

REPEAT = 4


def stream_once(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: (arrival time, text) of every content delta, and the final guardchat object."""
    started = time.perf_counter()
    arrivals: list[tuple[float, str]] = []
    extra: dict[str, Any] = {}
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"stream error: {data['error']}")
            delta = (data.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                arrivals.append(((time.perf_counter() - started) * 1000, delta["content"]))
            if data.get("guardchat"):
                extra = data["guardchat"]
    return {"arrivals": arrivals, "guardchat": extra, "total_ms": (time.perf_counter() - started) * 1000}


def token_delays(arrivals: list[tuple[float, str]], ttft_ms: float, itl_ms: float) -> tuple[list[float], str]:
    """Per backend token: client arrival of its last character minus its emission at the backend."""
    text = "".join(t for _, t in arrivals)
    arrival_of_char: list[float] = []
    for at, piece in arrivals:
        arrival_of_char += [at] * len(piece)
    delays: list[float] = []
    position = 0
    for index, token in enumerate(tokens_of(text)):
        position += len(token)
        if position - 1 < len(arrival_of_char):
            delays.append(arrival_of_char[position - 1] - (ttft_ms + index * itl_ms))
    return delays, text


def measure(url: str, body_of: Any, n: int, ttft_ms: float, itl_ms: float) -> dict[str, Any]:
    ttfts, delays, gaps, budgets, totals = [], [], [], [], []
    with httpx.Client(timeout=120) as client:
        stream_once(client, url, body_of(0))  # warm-up
        for i in range(n):
            result = stream_once(client, url, body_of(i))
            arrivals = result["arrivals"]
            if not arrivals:
                raise RuntimeError("no content streamed")
            ttfts.append(arrivals[0][0])
            totals.append(result["total_ms"])
            gaps += [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
            d, _ = token_delays(arrivals, ttft_ms, itl_ms)
            delays += d
            timings = (result["guardchat"] or {}).get("timings_ms") or {}
            if timings:
                # Both input rails and retrieval need the turn's one query embedding (`embed`, computed once
                # and shared), so each branch of the max includes it: max(embed + rails, embed + retrieve).
                embed = timings.get("embed", 0.0)
                budgets.append(embed + max(timings.get("input_rails", 0.0), timings.get("retrieve", 0.0)) + 5.0)
    out: dict[str, Any] = {"ttft_ms": summarize(ttfts), "token_delay_ms": summarize(delays),
                           "gap_ms": summarize(gaps), "total_ms": summarize(totals)}
    if budgets:
        out["p2_budget_over_backend_ms"] = summarize(budgets)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--chunk-chars", type=int, nargs="+", default=[200, 80, 40])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.quick:
        apply_quick(args, parser, requests=2, chunks=300, chunk_chars=[200], ttft_ms=50.0, itl_ms=5.0)

    corpus = build_corpus(args.chunks)
    backends = start_backends(args.ttft_ms, args.itl_ms, repeat=REPEAT)
    results: dict[str, Any] = {}
    try:
        def direct_body(i: int) -> dict[str, Any]:
            return {"model": "fake-llm", "stream": True, "messages": [{"role": "user", "content": QUESTIONS[i % 12]}]}

        results["backend alone"] = measure(backends.llm.url + "/v1/chat/completions", direct_body, args.requests,
                                           args.ttft_ms, args.itl_ms)
        for chunk_chars in args.chunk_chars:
            env = guardchat_env(backends, corpus, None, GUARDCHAT_OUTPUT_RAILS_CHUNK_CHARS=str(chunk_chars))
            server = start_guardchat(env)
            try:
                results[f"guardchat, hold-back window {chunk_chars} chars"] = measure(
                    server.url + "/v1/chat/completions", direct_body, args.requests, args.ttft_ms, args.itl_ms)
            finally:
                server.stop()
    finally:
        backends.stop()

    backend_ttft = results["backend alone"]["ttft_ms"]["p50"]
    rows = []
    for name, r in results.items():
        budget = r.get("p2_budget_over_backend_ms", {}).get("p50")
        added = r["ttft_ms"]["p50"] - backend_ttft
        rows.append([name, r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], round(added, 1) if budget else "-",
                     round(budget, 1) if budget else "-",
                     ("MET" if added <= budget else f"MISSED by {added - budget:.0f} ms") if budget else "-",
                     r["token_delay_ms"]["p50"], r["token_delay_ms"]["p99"], r["gap_ms"]["p50"], r["gap_ms"]["p99"]])
    table = print_table(
        ["setup", "TTFT p50", "TTFT p99", "added TTFT p50", "P2 budget p50", "P2", "token delay p50",
         "token delay p99", "gap p50", "gap p99"], rows,
        f"Streaming (ms): backend TTFT {args.ttft_ms:g} ms, {args.itl_ms:g} ms/token, "
        f"{len(reply_for('', REPEAT))}-char answer")
    write_result("streaming_ttft", {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "results": results, "table": table}, args.results_dir)


if __name__ == "__main__":
    main()
