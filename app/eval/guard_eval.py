"""Safety and topic evaluation of a guard: run the input rails on labelled rows, then summarise.

Two ways to run the rows, one summary:
- in-process: `await eval_guard(guard, embedder, rows)` (also what the admin console calls for a draft
  config before publishing it);
- against a running server: `await check_via_server(url, rows, api_key=...)` through `POST /v1/checks`.

A guard error counts as a block (the product fails closed); a transport failure (server unreachable,
HTTP error) is an `error` outcome, reported but kept out of the rates.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.eval.data import EvalRow, normalize_rows

MAX_LISTED = 200  # misses / false refusals listed in a report
SNIPPET = 300


@dataclass
class Outcome:
    row: EvalRow
    blocked: bool
    blocked_by: str | None = None
    rails: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float = 0.0
    error: str | None = None


def _as_rows(rows: list[EvalRow] | list[dict[str, Any]]) -> list[EvalRow]:
    dicts = [r for r in rows if isinstance(r, dict)]
    return normalize_rows(dicts) + [r for r in rows if isinstance(r, EvalRow)]


async def check_in_process(guard: Any, embedder: Any, rows: list[EvalRow], batch: int = 64) -> list[Outcome]:
    """Runs `guard.check_input` on every row (one at a time, so latencies are not inflated by contention).
    Embeddings are computed in batches up front; the latency is the guard's own check time."""
    outcomes: list[Outcome] = []
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        vectors = await asyncio.to_thread(embedder.embed, [r.text for r in part])
        for row, vec in zip(part, vectors, strict=True):
            began = time.perf_counter()
            decision = await guard.check_input([{"role": "user", "content": row.text}], vec)
            latency = (time.perf_counter() - began) * 1000
            outcomes.append(
                Outcome(
                    row=row,
                    blocked=not decision.allowed,
                    blocked_by=decision.blocked_by,
                    rails=[r.to_dict() for r in decision.rails],
                    latency_ms=latency,
                )
            )
    return outcomes


async def check_via_server(
    url: str, rows: list[EvalRow], *, api_key: str | None = None, concurrency: int = 2, timeout_s: float = 60
) -> list[Outcome]:
    """Posts every row to `{url}/v1/checks`. The latency is the server-reported guard latency."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as client:

        async def one(i: int, row: EvalRow) -> Outcome:
            async with semaphore:
                began = time.perf_counter()
                try:
                    response = await client.post("/v1/checks", json={"input": row.text}, headers={
                        "X-Request-Id": f"eval-{i}"})
                    body = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    return Outcome(row=row, blocked=False, error=f"{type(exc).__name__}: {exc}")
                if response.status_code != 200 or not isinstance(body, dict) or "allowed" not in body:
                    message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
                    return Outcome(row=row, blocked=False, error=f"HTTP {response.status_code}: {message or body}")
                return Outcome(
                    row=row,
                    blocked=not body["allowed"],
                    blocked_by=body.get("blocked_by"),
                    rails=list(body.get("rails") or []),
                    latency_ms=float(body.get("latency_ms") or (time.perf_counter() - began) * 1000),
                )

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    arr = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "mean": round(float(arr.mean()), 3), "max": round(float(arr.max()), 3)}


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _group(outcomes: list[Outcome]) -> dict[str, Any]:
    should_block = [o for o in outcomes if o.row.expected == "block"]
    should_allow = [o for o in outcomes if o.row.expected == "allow"]
    blocked = sum(o.blocked for o in should_block)
    refused = sum(o.blocked for o in should_allow)
    return {
        "n": len(outcomes),
        "should_block": len(should_block),
        "blocked": blocked,
        "block_rate": _rate(blocked, len(should_block)),
        "should_allow": len(should_allow),
        "refused": refused,
        "false_refusal_rate": _rate(refused, len(should_allow)),
    }


def _by(outcomes: list[Outcome], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(getattr(o.row, key), []).append(o)
    return {name: _group(items) for name, items in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}


def _by_rail(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Per rail: the blocks it decided (right and wrong), how often it said block/flag/error, its latency."""
    stats: dict[str, dict[str, Any]] = {}
    latencies: dict[str, list[float]] = {}
    for o in outcomes:
        for rail in o.rails:
            name = str(rail.get("name"))
            s = stats.setdefault(name, {"checked": 0, "verdicts": {}, "decided_blocks": 0, "correct_blocks": 0,
                                        "false_refusals": 0})
            s["checked"] += 1
            verdict = str(rail.get("verdict"))
            s["verdicts"][verdict] = s["verdicts"].get(verdict, 0) + 1
            latencies.setdefault(name, []).append(float(rail.get("latency_ms") or 0.0))
        if o.blocked and o.blocked_by:
            s = stats.setdefault(o.blocked_by, {"checked": 0, "verdicts": {}, "decided_blocks": 0,
                                                "correct_blocks": 0, "false_refusals": 0})
            s["decided_blocks"] += 1
            s["correct_blocks" if o.row.expected == "block" else "false_refusals"] += 1
    total_should_block = sum(1 for o in outcomes if o.row.expected == "block")
    for name, s in stats.items():
        s["share_of_harmful_blocked"] = _rate(s["correct_blocks"], total_should_block)
        s["latency_ms"] = percentiles(latencies.get(name, []))
    return dict(sorted(stats.items()))


def _listing(o: Outcome) -> dict[str, Any]:
    text = " ".join(o.row.text.split())
    return {
        "text": text[:SNIPPET] + ("…" if len(text) > SNIPPET else ""),
        "label": o.row.label,
        "category": o.row.category,
        "source": o.row.source,
        "blocked_by": o.blocked_by,
        "rails": [f"{r.get('name')}={r.get('verdict')}" + (f"({r.get('score'):.2f})" if isinstance(
            r.get("score"), int | float) else "") for r in o.rails],
        # Which stage decided (detector, example, judge, guard_error ...): the JSON keeps it for the analysis.
        "details": {str(r.get("name")): str(r.get("detail")) for r in o.rails if r.get("detail")},
    }


def verdicts_digest(outcomes: list[Outcome]) -> str:
    """One hash of every row's decision (text, blocked, deciding rail): two runs decided alike iff equal."""
    digest = hashlib.sha256()
    for o in outcomes:
        digest.update(f"{o.row.text}\0{o.blocked}\0{o.blocked_by}\n".encode())
    return digest.hexdigest()


def summarize(outcomes: list[Outcome], kind: str = "safety") -> dict[str, Any]:
    """The report dict: overall / per-label / per-category / per-rail rates, confusion, latency, misses."""
    ok = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    overall = _group(ok)
    tp = overall["blocked"]
    fn = overall["should_block"] - tp
    fp = overall["refused"]
    tn = overall["should_allow"] - fp
    return {
        "kind": kind,
        "rows": len(outcomes),
        "errors": len(failed),
        "error_examples": [o.error for o in failed[:5]],
        "overall": {**overall, "accuracy": _rate(tp + tn, len(ok)),
                    "guard_errors": sum(1 for o in ok if any(r.get("verdict") == "error" for r in o.rails))},
        "confusion": {"rows": "expected", "columns": "actual", "labels": ["block", "allow"],
                      "matrix": [[tp, fn], [fp, tn]]},
        "by_label": _by(ok, "label"),
        "by_category": _by(ok, "category"),
        "by_source": _by(ok, "source"),
        "by_rail": _by_rail(ok),
        "latency_ms": percentiles([o.latency_ms for o in ok]),
        "latencies_ms": [round(o.latency_ms, 3) for o in ok],
        "verdicts_sha256": verdicts_digest(ok),
        "misses": [_listing(o) for o in ok if o.row.expected == "block" and not o.blocked][:MAX_LISTED],
        "false_refusals": [_listing(o) for o in ok if o.row.expected == "allow" and o.blocked][:MAX_LISTED],
        "guard_error_rows": [_listing(o) for o in ok if any(r.get("verdict") == "error" for r in o.rails)][:MAX_LISTED],
    }


async def eval_guard(guard: Any, embedder: Any, rows: list[EvalRow] | list[dict[str, Any]],
                     kind: str = "safety") -> dict[str, Any]:
    """In-process eval of one guard (e.g. a draft rails config in the admin console).
    `rows` are EvalRows or raw dataset dicts ({"text", "label", "category"?, "expected"?}).
    Returns the report dict (see `summarize`); `app.eval.report.render_markdown(report)` renders it."""
    outcomes = await check_in_process(guard, embedder, _as_rows(rows))
    return summarize(outcomes, kind)
