"""Closed-loop HTTP load generator (async httpx), run in its own process by the benchmarks:

    python -m bench.loadgen --kind guardchat --url http://127.0.0.1:8000 --concurrency 32 --duration 20

`--concurrency` workers each send one request, wait for the full answer, and send the next (closed loop).
Prints one JSON object on stdout: per-request latencies (ms), errors, and for guardchat the
`guardchat.timings_ms` and rail latencies of every answer, so the caller can split model time out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench.common import cpu_seconds

# Bank-support questions that the shipped rails allow and the benchmark corpus can answer.
QUESTIONS = [
    "How do I dispute a card transaction?",
    "What is the daily ATM withdrawal limit for a Premier debit card?",
    "How much does Larkspur charge at a non-network ATM?",
    "How do I activate my new debit card?",
    "Can I set up alerts for low balance?",
    "How long does an ACH transfer to an external account take?",
    "What should I do if I see a fraudulent charge?",
    "How do I reset my online banking password?",
    "Is there a fee for an outgoing wire transfer?",
    "How do I order new checks?",
    "What are the overdraft fees on Everyday Checking?",
    "How can I find the nearest Larkspur branch?",
]
TURNS_PER_SESSION = 20  # a worker starts a fresh session after this many turns (bounded history, like real users)


@dataclass
class Sample:
    latency_ms: float
    status: int
    timings: dict[str, float] = field(default_factory=dict)
    rails: list[dict[str, Any]] = field(default_factory=list)
    blocked: bool = False
    citations: int = 0
    answer_chars: int = 0


@dataclass
class LoadResult:
    kind: str
    concurrency: int
    duration_s: float
    samples: list[Sample]
    errors: list[str]
    # CPU seconds the watched server processes used while the samples were recorded (None: not watched).
    server_cpu_s: float | None = None

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "samples": [asdict(s) for s in self.samples],
            "errors": self.errors[:50],
            "error_count": len(self.errors),
            "server_cpu_s": self.server_cpu_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadResult:
        samples = [Sample(**s) for s in data["samples"]]
        errors = list(data["errors"]) + [""] * max(0, data.get("error_count", 0) - len(data["errors"]))
        return cls(data["kind"], data["concurrency"], data["duration_s"], samples, errors, data.get("server_cpu_s"))


def request_body(kind: str, question: str, config_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "fake-llm", "messages": [{"role": "user", "content": question}]}
    if kind == "nemo":
        body["guardrails"] = {"config_id": config_id}
    return body


async def _worker(
    worker: int,
    client: httpx.AsyncClient,
    kind: str,
    config_id: str | None,
    stop_at: float,
    record_from: float,
    samples: list[Sample],
    errors: list[str],
    sessions: bool,
) -> None:
    turn = worker  # spread the questions across workers
    session_id: str | None = None
    turns_in_session = 0
    while time.perf_counter() < stop_at:
        headers: dict[str, str] = {}
        if kind == "guardchat" and sessions:
            if session_id is None or turns_in_session >= TURNS_PER_SESSION:
                created = await client.post("/api/sessions")
                session_id, turns_in_session = created.json()["id"], 0
            headers["X-Session-Id"] = session_id
            turns_in_session += 1
        question = QUESTIONS[turn % len(QUESTIONS)]
        turn += 1
        started = time.perf_counter()
        try:
            response = await client.post("/v1/chat/completions", json=request_body(kind, question, config_id),
                                         headers=headers)
            latency = (time.perf_counter() - started) * 1000
            sample = Sample(latency, response.status_code)
            if response.status_code == 200:
                data = response.json()
                sample.answer_chars = len(data["choices"][0]["message"]["content"] or "")
                extra = data.get("guardchat") or {}
                sample.timings = extra.get("timings_ms") or {}
                sample.rails = [{"name": r.get("name"), "verdict": r.get("verdict"),
                                 "latency_ms": r.get("latency_ms", 0.0)} for r in extra.get("rails") or []]
                sample.blocked = bool(extra.get("blocked"))
                sample.citations = len(extra.get("citations") or [])
            else:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
        except httpx.HTTPError as exc:
            latency = (time.perf_counter() - started) * 1000
            sample = Sample(latency, 0)
            errors.append(f"{type(exc).__name__}: {exc}")
        if started >= record_from:
            samples.append(sample)


async def run_load(
    url: str,
    *,
    kind: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 2.0,
    config_id: str | None = None,
    sessions: bool = True,
    timeout_s: float = 60.0,
    cpu_pids: list[int] | None = None,
) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    samples: list[Sample] = []
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:
        begin = time.perf_counter()
        record_from = begin + warmup_s
        stop_at = record_from + duration_s
        cpu_at_start: list[float] = []

        async def note_cpu_after_warmup() -> None:
            await asyncio.sleep(max(0.0, record_from - time.perf_counter()))
            cpu_at_start.append(sum(cpu_seconds(p) for p in cpu_pids or []))

        await asyncio.gather(note_cpu_after_warmup(), *(
            _worker(i, client, kind, config_id, stop_at, record_from, samples, errors, sessions)
            for i in range(concurrency)
        ))
        elapsed = time.perf_counter() - record_from
        server_cpu = sum(cpu_seconds(p) for p in cpu_pids) - cpu_at_start[0] if cpu_pids else None
    recorded_errors = [e for e in errors][: len(errors)]
    return LoadResult(kind, concurrency, elapsed, samples, recorded_errors, server_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description="closed-loop HTTP load")
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=["guardchat", "nemo", "backend"], required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--config-id", default=None)
    parser.add_argument("--no-sessions", action="store_true")
    parser.add_argument("--cpu-pid", type=int, action="append", default=[],
                        help="a server process whose CPU time (with its children) is measured per turn")
    args = parser.parse_args()
    result = asyncio.run(run_load(
        args.url, kind=args.kind, concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup,
        config_id=args.config_id, sessions=not args.no_sessions, cpu_pids=args.cpu_pid,
    ))
    json.dump(result.to_dict(), sys.stdout)


if __name__ == "__main__":
    main()
