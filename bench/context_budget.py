"""Grounded-prompt size, "answer still in context" and time to first token (issue 18, item 1).

    .venv/bin/python -m bench.context_budget --out /tmp/after.json
    # the previous code, from a worktree of it (the script copied in; it uses only APIs both trees have):
    cd ../prev && PYTHONPATH=. /work/main/.venv/bin/python -m bench.context_budget --out /tmp/before.json
    # Qwen token counts of both prompt sets (llama.cpp /apply-template + /tokenize, no evaluation):
    .venv/bin/python -m bench.context_budget --out /tmp/after.json --tokenize --before /tmp/before.json
    # TTFT of both prompt sets on one embedded llama.cpp server, requests alternating before/after:
    .venv/bin/python -m bench.context_budget --out /tmp/after.json --ttft 8 --before /tmp/before.json

The knowledge base is ingested into a temp dir; each task's question is searched as the server does (hybrid,
threshold on, `rag_top_k`) and its prompt built by app/pipeline/context.build_prompt with the shipped system
prompt. Per task set: prompt characters and approximate tokens (words x 1.3, chain.approx_tokens), and the
share of tasks whose `answer_contains` strings (all of them, case-insensitive: the eval's accuracy rule) are in
the prompt's sources, beside the share in the retrieved chunks (the ceiling). TTFT: streamed requests to the
embedded Qwen2.5-1.5B (all cores), max 4 tokens; llama.cpp's timings give prompt_n (tokens read) and cache_n
(tokens reused from the KV cache: the fixed instructions prefix).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from app.settings import PROJECT_ROOT, Settings

TASK_SETS = [
    "tests/data/rag_tasks.jsonl",
    "tests/data/rag_tasks_hard_dev.jsonl",
    "tests/data/rag_tasks_hard_test.jsonl",
]


def _texts() -> Any:
    from app.guard.base import AssistantTexts

    raw = yaml.safe_load((PROJECT_ROOT / "rails" / "config.yml").read_text(encoding="utf-8"))
    system = "\n".join(str(i.get("content", "")).strip() for i in raw.get("instructions", []))
    return AssistantTexts(system_prompt=system)


def _holds(text: str, expected: list[str]) -> bool:
    lowered = " ".join(text.lower().split())
    return all(" ".join(e.lower().split()) in lowered for e in expected)


def build_prompts(tasks_paths: list[str]) -> dict[str, Any]:
    from app.pipeline import context
    from app.rag.chain import approx_tokens
    from app.rag.embedder import get_embedder
    from app.rag.ingest import ingest_directory
    from app.rag.retrieve import HybridRetriever

    embedder = get_embedder()
    texts = _texts()
    out: dict[str, Any] = {"sets": {}, "prompts": []}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), knowledge_dir=PROJECT_ROOT / "knowledge", embed_ingest_precision="same")
        ingest_directory(None, settings, embedder=embedder, progress=False)
        retriever = HybridRetriever(settings)
        state = SimpleNamespace(settings=settings, retriever=retriever, extras={})
        for path in tasks_paths:
            tasks = [
                json.loads(line) for line in (PROJECT_ROOT / path).read_text(encoding="utf-8").splitlines() if line
            ]
            vectors = embedder.embed([t["question"] for t in tasks])
            rows = []
            for task, vec in zip(tasks, vectors, strict=True):
                chunks, _ = retriever.search(task["question"], vec, settings.rag_top_k)
                started = time.perf_counter()
                messages, sources = context.build_prompt(state, task["question"], [], chunks, texts, True)  # type: ignore[arg-type]
                build_ms = (time.perf_counter() - started) * 1e3
                if messages is None:
                    continue
                system = messages[0]["content"]
                block = system[system.index("Sources:") :]
                expected = task.get("answer_contains") or []
                rows.append(
                    {
                        "question": task["question"],
                        "set": path,
                        "messages": messages,
                        "chars": sum(len(m["content"]) for m in messages),
                        "tokens": sum(approx_tokens(m["content"]) for m in messages),
                        "source_tokens": approx_tokens(block),
                        "sources": len(sources),
                        "build_ms": build_ms,
                        "scored": bool(expected) and not task.get("unanswerable"),
                        "in_chunks": _holds("\n".join(c.content for c in chunks), expected),
                        "in_prompt": _holds(block, expected),
                    }
                )
            out["sets"][path] = _summary(rows)
            out["prompts"] += rows
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if r["scored"]]
    return {
        "prompts": len(rows),
        "chars_mean": round(statistics.mean(r["chars"] for r in rows)),
        "tokens_mean": round(statistics.mean(r["tokens"] for r in rows)),
        "tokens_p50": statistics.median(r["tokens"] for r in rows),
        "tokens_max": max(r["tokens"] for r in rows),
        "source_tokens_mean": round(statistics.mean(r["source_tokens"] for r in rows)),
        "sources_mean": round(statistics.mean(r["sources"] for r in rows), 2),
        "build_ms_p50": round(statistics.median(r["build_ms"] for r in rows), 3),
        "scored_tasks": len(scored),
        "answer_in_chunks": round(sum(r["in_chunks"] for r in scored) / len(scored), 3),
        "answer_in_prompt": round(sum(r["in_prompt"] for r in scored) / len(scored), 3),
        "lost": [r["question"] for r in scored if r["in_chunks"] and not r["in_prompt"]],
    }


def time_to_first_token(after: list[dict[str, Any]], before: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Alternates before/after requests on one server, so load drift hits both alike. Consecutive requests are
    always different questions (before q1, after q2, before q3, …, then after q1, before q2, …): a prompt then
    shares only the fixed instructions with the one before it, as a new customer's question would, and never its
    own question's sources (which would flatter whichever variant came second)."""
    from app.llm.embedded import EmbeddedLLMServer
    from bench.embedded_model import one_request

    model = PROJECT_ROOT / "data" / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    by_question = {p["question"]: p for p in before}
    pairs = [(p, by_question.get(p["question"])) for p in after if p["scored"]][:n]
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    order = [(i, ("before", "after")[(i + first) % 2]) for first in (0, 1) for i in range(len(pairs))]
    with EmbeddedLLMServer(model, model_name="qwen2.5-1.5b", ctx_size=4096, threads=0, parallel=1) as server:
        for i, name in order:
            prompt = pairs[i][0] if name == "after" else pairs[i][1]
            if prompt is not None:
                run = one_request(server.base_url, "qwen2.5-1.5b", prompt["messages"], 4)
                run["question"] = prompt["question"]
                runs[name].append(run)
                print(name, json.dumps(run), flush=True)
    result: dict[str, Any] = {"threads": server.threads}
    for name, rs in runs.items():
        if rs:
            warm = [r for r in rs if r["cached_tokens"]]  # the very first request found an empty cache
            result[name] = {
                "requests": len(rs),
                "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in warm),
                "ttft_ms_mean": round(statistics.mean(r["ttft_ms"] for r in warm)),
                "prompt_tokens_read_mean": round(statistics.mean(r["prompt_tokens"] or 0 for r in warm)),
                "cached_tokens_mean": round(statistics.mean(r["cached_tokens"] or 0 for r in warm)),
                "prompt_tok_s_p50": statistics.median(r["prompt_tok_s"] for r in warm),
                "runs": rs,
            }
    return result


def real_tokens(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> dict[str, Any]:
    """Qwen2.5 tokens of every prompt through the GGUF's own chat template (llama.cpp /apply-template and
    /tokenize, no evaluation): the whole prompt, and the part after the fixed instructions (what a warm KV cache
    does not hold: sources, question, template tail)."""
    import httpx

    from app.llm.embedded import EmbeddedLLMServer

    model = PROJECT_ROOT / "data" / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    result: dict[str, Any] = {}
    with (
        EmbeddedLLMServer(model, model_name="qwen2.5-1.5b", ctx_size=4096, parallel=1) as server,
        httpx.Client(base_url=server.root_url, timeout=60) as client,
    ):

        def count(text: str) -> int:
            return len(client.post("/tokenize", json={"content": text}).json()["tokens"])

        for name, prompts in (("before", before), ("after", after)):
            by_set: dict[str, list[tuple[int, int]]] = {}
            for p in prompts:
                text = client.post("/apply-template", json={"messages": p["messages"]}).json()["prompt"]
                system = p["messages"][0]["content"]
                fixed = count(text[: text.index(system) + system.index("Sources:")])
                total = count(text)
                by_set.setdefault(p.get("set", "?"), []).append((total, total - fixed))
            result[name] = {
                k: {"prompt_tokens_mean": round(statistics.mean(t for t, _ in v)),
                    "uncached_tokens_mean": round(statistics.mean(u for _, u in v)), "prompts": len(v)}
                for k, v in by_set.items()
            }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=TASK_SETS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ttft", type=int, default=0, help="time this many grounded questions (0: none)")
    parser.add_argument("--before", type=Path, help="the previous code's --out file, timed alternately")
    parser.add_argument("--tokenize", action="store_true", help="count Qwen tokens of both prompt sets")
    args = parser.parse_args()
    result = build_prompts(args.sets)
    print(json.dumps(result["sets"], indent=1), flush=True)
    before = json.loads(args.before.read_text())["prompts"] if args.before else []
    if args.tokenize:
        result["qwen_tokens"] = real_tokens(result["prompts"], before)
        print(json.dumps(result["qwen_tokens"], indent=1), flush=True)
    if args.ttft:
        result["ttft"] = time_to_first_token(result["prompts"], before, args.ttft)
        print(
            json.dumps(
                {
                    k: {kk: vv for kk, vv in v.items() if kk != "runs"} if isinstance(v, dict) else v
                    for k, v in result["ttft"].items()
                },
                indent=1,
            )
        )
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
