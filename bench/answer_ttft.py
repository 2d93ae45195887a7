"""Time to first token of grounded answers, end to end, of this tree and another (issue 18's "TTFT <= 1/3").

    # the previous code in a worktree, with its own data/ (models linked, its own index):
    git worktree add /tmp/old 9041754 && mkdir -p /tmp/old/data && ln -s "$PWD/data/models" /tmp/old/data/models
    (cd /tmp/old && PYTHONPATH=. /work/main/.venv/bin/python -m app.cli ingest --if-missing)
    .venv/bin/python -m bench.answer_ttft --tree before=/tmp/old --tree after=. --questions 12 --rounds 2
    # the same tree twice, one setting apart:
    .venv/bin/python -m bench.answer_ttft --tree pages=. --tree passages=. \
        --env passages:GUARDCHAT_RAG_CONTEXT_MODE=passages --env pages:GUARDCHAT_RAG_CONTEXT_MODE=pages

Each tree's server (bench/serve.py of that tree, its own data/, the shipped rails and the embedded stack, UI off)
is started in turn, never two at once, and asked the first N questions of tests/data/rag_tasks.jsonl (answerable
bank questions), each in a new session, streamed at temperature 0 through /v1/chat/completions. TTFT is the wall
time from the request to the first non-empty content delta the client receives — after the input rails and the
output rail's first window, as a customer sees it. Rounds alternate the order of the trees (A B, then B A), so drift
of the machine hits both; the first request of each server start is a warm-up and not counted. A server with answer
pages (`GUARDCHAT_RAG_CONTEXT_MODE=pages`) is asked once it has read them into the LLM's prompt cache (its /readyz
says how far it got); the time that took is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import PYTHON, free_port, print_table, start_child, summarize, write_result

TASKS = Path(__file__).resolve().parent.parent / "tests/data/rag_tasks.jsonl"
WARM_UP = "What are your branch hours?"


def _questions(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["question"] for row in rows if row.get("answer_contains")][:n]


def ask(client: httpx.Client, model: str, question: str) -> dict[str, Any]:
    """One streamed question in a new session: TTFT, total time and the answer's text."""
    body = {"model": model, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content") or ""
            if content and first is None:
                first = time.perf_counter() - started
            parts.append(content)
    total = time.perf_counter() - started
    return {"question": question, "ttft_s": round(first if first is not None else total, 3),
            "total_s": round(total, 3), "answer": "".join(parts)[:300]}


def wait_for_answer_pages(client: httpx.Client, timeout_s: float = 7200) -> float | None:
    """With answer pages (rag_context_mode "pages"), waits until the server has read them all into the LLM's
    prompt cache (what a server that has been up a while has); None for a server without them."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        pages = client.get("/readyz").json().get("answer_pages")
        if pages is None:
            return None
        if pages["pending"] == 0 and pages["warm"] > 0:
            return time.perf_counter() - started
        time.sleep(2)
    raise TimeoutError("the answer pages were not read in time")


def run_tree(label: str, tree: Path, questions: list[str], extra_env: dict[str, str]) -> list[dict[str, Any]]:
    env = {**extra_env,
        "PYTHONPATH": str(tree), "GUARDCHAT_DATA_DIR": str(tree / "data"), "GUARDCHAT_UI_ENABLED": "false",
        "GUARDCHAT_LOG_LEVEL": "warning", "GUARDCHAT_REDIS_KEY_PREFIX": f"bench-ttft-{uuid.uuid4().hex[:8]}:",
    }
    port = free_port()
    child = start_child(f"ttft-{label}", [PYTHON, "-m", "bench.serve", "--port", str(port)], port,
                        env=env, ready_path="/healthz", timeout=900, cwd=tree)
    try:
        with httpx.Client(base_url=child.url, timeout=600) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            ask(client, model, WARM_UP)
            waited = wait_for_answer_pages(client)
            if waited is not None:
                print(f"{label}: answer pages read into the LLM's cache in {waited:.0f} s", flush=True)
            rows = []
            for question in questions:
                rows.append({"tree": label, **ask(client, model, question)})
                print(f"{label}: {rows[-1]['ttft_s']:6.2f} s  {question[:60]}", flush=True)
            return rows
    finally:
        child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="LABEL=DIR of a checkout with data/")
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", type=Path, default=TASKS)
    parser.add_argument("--name", default="answer_ttft")
    parser.add_argument("--env", action="append", default=[], help="LABEL:KEY=VALUE, an environment variable for "
                        "one tree's server (e.g. after:GUARDCHAT_RAG_CONTEXT_MODE=passages)")
    args = parser.parse_args()
    trees = [(label, Path(path).resolve()) for label, path in (t.split("=", 1) for t in args.tree)]
    envs: dict[str, dict[str, str]] = {}
    for item in args.env:
        label, assignment = item.split(":", 1)
        key, value = assignment.split("=", 1)
        envs.setdefault(label, {})[key] = value
    questions = _questions(args.tasks, args.questions)
    rows: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        for label, tree in trees if round_no % 2 == 0 else trees[::-1]:
            rows += [{**row, "round": round_no} for row in run_tree(label, tree, questions, envs.get(label, {}))]
    summary = {label: summarize([r["ttft_s"] for r in rows if r["tree"] == label]) for label, _ in trees}
    print_table(["tree", "n", "TTFT p50 s", "p90 s", "mean s", "max s"],
                [[k, v["n"], v["p50"], v["p90"], v["mean"], v["max"]] for k, v in summary.items()],
                title=f"grounded-answer TTFT, {os.cpu_count()} cores")
    write_result(args.name, {"trees": {k: str(v) for k, v in trees}, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
