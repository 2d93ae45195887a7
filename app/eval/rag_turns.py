"""End-to-end RAG tasks run as a customer meets them: every turn goes through the real turn pipeline (input rails,
rewrite, retrieval, generation, held-back output rails, session history), in-process (`TurnRunner` with a session
of the app's own store, streamed) or against a running server (`/v1/chat/completions`, streamed, `X-Session-Id`).

Task (JSONL), one conversation per line:

    {"kind": "single|fees|alarming|followup|conversation|unanswerable",
     "turns": [{"user": "..."}, {"user": "...", "answer_contains": ["$25", ["1-5", "1 to 5"]],
               "gold_document_ids": ["wire-transfers"], "from": "conversation"?, "unanswerable": bool?}]}

A turn is scored when it carries `answer_contains` or `unanswerable`; the others only build the history. An item of
`answer_contains` that is a list is a set of alternatives (any one counts). The old single-question format
(`{"question", "gold_document_ids", "answer_contains", "unanswerable"}`) is read as a one-turn task. What each turn
gives is a `TurnOutcome`; `app/eval/rag_score.py` turns the outcomes into the report.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

KINDS = ("single", "fees", "alarming", "followup", "conversation", "unanswerable")


@dataclass
class TurnOutcome:
    user: str
    answer: str
    blocked: bool = False
    blocked_by: str | None = None  # the rail that refused (input or output)
    citations: list[dict[str, Any]] = field(default_factory=list)
    retrieved_ids: list[str] = field(default_factory=list)  # chunk ids retrieval gave the turn
    source_ids: list[str] = field(default_factory=list)  # chunk ids the prompt held ([]: none, or not reported)
    answered_from: str | None = None  # "conversation", "small_talk", "no_sources" (the trace's field)
    ttft_ms: float | None = None  # request start -> first text the customer sees
    total_ms: float = 0.0
    error: str | None = None


class Driver(Protocol):
    async def new_session(self) -> str: ...

    async def turn(self, session_id: str, text: str) -> TurnOutcome: ...


# --- task files -------------------------------------------------------------------------------------------------


def as_turn_task(row: dict[str, Any]) -> dict[str, Any]:
    """A row of either format as a multi-turn task."""
    if "turns" in row:
        return row
    unanswerable = bool(row.get("unanswerable")) or not row.get("gold_document_ids")
    turn = {"user": row["question"], "gold_document_ids": list(row.get("gold_document_ids") or []),
            "answer_contains": list(row.get("answer_contains") or [])}
    if unanswerable:
        turn["unanswerable"] = True
    return {"kind": row.get("kind") or ("unanswerable" if unanswerable else "single"), "turns": [turn]}


def task_key(task: dict[str, Any]) -> str:
    return "\n".join(t["user"] for t in task["turns"])


def split_of(task: dict[str, Any]) -> str:
    """dev iff sha1 of the task's user turns is even: fixed, so nothing moves between the halves."""
    return "dev" if int(hashlib.sha1(task_key(task).encode()).hexdigest(), 16) % 2 == 0 else "test"


def is_scored(turn: dict[str, Any]) -> bool:
    return bool(turn.get("answer_contains")) or bool(turn.get("unanswerable"))


def load_tasks(paths: list[Path], *, limit: int | None = None, kinds: list[str] | None = None,
               split: str | None = None) -> list[dict[str, Any]]:
    """Tasks of every file (the first `limit` of each, after the kind and split filters)."""
    tasks: list[dict[str, Any]] = []
    for path in paths:
        rows = [as_turn_task(json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines()
                if line.strip()]
        rows = [t for t in rows if (not kinds or t["kind"] in kinds) and (not split or split_of(t) == split)]
        tasks += rows[:limit] if limit else rows
    return tasks


# --- answer matching ----------------------------------------------------------------------------------------------

_SUBS = (
    (re.compile(r"[*_`]"), ""),  # markdown emphasis
    (re.compile(r"[\u2013\u2014\u2212]"), "-"),  # en/em dash, minus
    (re.compile(r"[\u2018\u2019]"), "'"),
    (re.compile(r"(?<=\d),(?=\d{3}\b)"), ""),  # 1,500 -> 1500
    (re.compile(r"\b([ap])\.\s?m\.?(?=\W|$)"), r"\1m"),  # p.m. -> pm
    (re.compile(r"(\d):00\b"), r"\1"),  # 4:00 pm -> 4 pm
    (re.compile(r"(\d)\s*([ap]m)\b"), r"\1 \2"),  # 4pm -> 4 pm
    (re.compile(r"(\$\d+)\.00\b"), r"\1"),  # $3.00 -> $3
    (re.compile(r"\s+"), " "),
)


def normalise(text: str) -> str:
    """Lower case, one spelling for figures and times, so "$1,500.00" matches "$1500" and "4:00 p.m." "4 pm"."""
    text = text.lower()
    for pattern, replacement in _SUBS:
        text = pattern.sub(replacement, text)
    return text.strip()


def contains_expected(answer: str, expected: list[str | list[str]]) -> bool:
    """Every item found in the answer (an item that is a list: any one of its alternatives)."""
    said = normalise(answer)
    return all(any(normalise(alt) in said for alt in ([item] if isinstance(item, str) else item))
               for item in expected)


# --- drivers ------------------------------------------------------------------------------------------------------


class InProcessDriver:
    """Turns through `TurnRunner` on a built AppState, streamed as the UI streams them."""

    def __init__(self, state: Any) -> None:
        from app.pipeline.turn import TurnRunner

        self.state = state
        self.runner = TurnRunner(state)

    async def new_session(self) -> str:
        info = await self.state.store.create()
        return str(info.id)

    async def turn(self, session_id: str, text: str) -> TurnOutcome:
        from app.pipeline.turn import Delta, Done, TurnRequest

        request = TurnRequest(messages=[{"role": "user", "content": text}], session_id=session_id, stream=True)
        start = time.perf_counter()
        first: float | None = None
        events = self.runner.events(request)
        try:
            async for event in events:
                if isinstance(event, Delta) and event.text and first is None:
                    first = time.perf_counter()
                elif isinstance(event, Done):
                    result = event.result
                    break
            else:  # pragma: no cover - events() always ends with Done
                raise RuntimeError("turn ended without a result")
        finally:
            await events.aclose()
        trace = result.trace
        return TurnOutcome(
            user=text, answer=result.answer, blocked=result.blocked, blocked_by=trace.get("blocked_by"),
            citations=list(result.citations),
            retrieved_ids=[c["id"] for c in (trace.get("retrieval") or {}).get("chunks", [])],
            source_ids=list(trace.get("source_ids") or []),
            answered_from=trace.get("answered_from"),
            ttft_ms=None if first is None else (first - start) * 1000, total_ms=(time.perf_counter() - start) * 1000,
        )


class ServerDriver:
    """Turns through a running server: a session from `POST /api/sessions`, each turn a streamed
    `/v1/chat/completions` with `X-Session-Id`; the turn's trace (blocking rail, retrieved chunks) is read back from
    `GET /api/sessions/{id}`."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def new_session(self) -> str:
        response = await self.client.post("/api/sessions")
        response.raise_for_status()
        return str(response.json()["id"])

    async def turn(self, session_id: str, text: str) -> TurnOutcome:
        body = {"messages": [{"role": "user", "content": text}], "stream": True}
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        extra: dict[str, Any] = {}
        async with self.client.stream("POST", "/v1/chat/completions", json=body,
                                      headers={"X-Session-Id": session_id}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                content = (chunk["choices"][0].get("delta") or {}).get("content") or ""
                if content and first is None:
                    first = time.perf_counter()
                parts.append(content)
                extra = chunk.get("guardchat") or extra
        total_ms = (time.perf_counter() - start) * 1000
        trace = await self._trace(session_id, extra.get("turn_id"))
        return TurnOutcome(
            user=text, answer="".join(parts), blocked=bool(extra.get("blocked")), blocked_by=trace.get("blocked_by"),
            citations=list(extra.get("citations") or []),
            retrieved_ids=[c["id"] for c in (trace.get("retrieval") or {}).get("chunks", [])],
            source_ids=list(trace.get("source_ids") or []),
            answered_from=trace.get("answered_from"),
            ttft_ms=None if first is None else (first - start) * 1000, total_ms=total_ms,
        )

    async def _trace(self, session_id: str, turn_id: str | None) -> dict[str, Any]:
        response = await self.client.get(f"/api/sessions/{session_id}")
        if response.status_code != 200:
            return {}
        for turn in response.json().get("turns", []):
            if turn.get("id") == turn_id:
                trace: dict[str, Any] = (turn.get("metadata") or {}).get("trace") or {}
                return trace
        return {}


# --- running ------------------------------------------------------------------------------------------------------


def progress_line(index: int, total: int, task: dict[str, Any], outcomes: list[TurnOutcome], verdict: str) -> str:
    seconds = sum(o.total_ms for o in outcomes) / 1000
    question = task["turns"][-1]["user"]
    return f"[{index}/{total}] {task['kind']:<12} {verdict:<9} {seconds:5.1f}s  {question[:70]}"


async def run_tasks(
    tasks: list[dict[str, Any]],
    driver: Driver,
    *,
    verdict: Callable[[dict[str, Any], list[TurnOutcome]], str] = lambda task, outcomes: "done",
    on_progress: Callable[[str], None] | None = lambda line: print(line, file=sys.stderr, flush=True),
    log_path: Path | None = None,
    log_extra: dict[str, Any] | None = None,
) -> list[list[TurnOutcome]]:
    """Each task in a new session, its turns in order; a progress line per task (stderr by default) and, with
    `log_path`, the task and its outcomes appended there as one JSON line (a run stopped early keeps what it did).
    A turn that fails (transport error) ends its task with an outcome carrying `error`."""
    results: list[list[TurnOutcome]] = []
    for index, task in enumerate(tasks, 1):
        session_id = await driver.new_session()
        outcomes: list[TurnOutcome] = []
        for turn in task["turns"]:
            try:
                outcomes.append(await driver.turn(session_id, turn["user"]))
            except Exception as exc:  # noqa: BLE001 - one broken turn must not lose the whole run
                outcomes.append(TurnOutcome(user=turn["user"], answer="", error=f"{type(exc).__name__}: {exc}"))
                break
        results.append(outcomes)
        if log_path is not None:
            with log_path.open("a", encoding="utf-8") as log:
                log.write(json.dumps({"task": task, "verdict": verdict(task, outcomes),
                                      "outcomes": [asdict(o) for o in outcomes], **(log_extra or {})}) + "\n")
        if on_progress is not None:
            on_progress(progress_line(index, len(tasks), task, outcomes, verdict(task, outcomes)))
    return results

