"""Fast checks of the benchmark parts (no timing assertions): the fake backends speak the exact wire
protocol our clients use, the load generator and the summaries work on real responses, the batching
embedder returns the same vectors as the model it wraps, and the FAISS/profiling helpers compute what
they claim."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.guard.llama_guard import LlamaGuardClient, SafetyCategory
from app.llm.base import GenerationOptions
from app.llm.client import OpenAICompatClient
from app.rag.batching import BatchingEmbedder
from bench.common import Child, apply_quick, free_port, percentile, start_child, summarize
from bench.fake_backends import ANSWER, command, reply_for
from bench.loadgen import run_load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[Child]:
    port = free_port()
    child = start_child("test-fake-llm", command(port, ttft_ms=30, itl_ms=2), port, timeout=120)
    yield child
    child.stop()


async def test_fake_backend_speaks_openai_chat_plain_and_streamed(fake_llm: Child) -> None:
    client = OpenAICompatClient(fake_llm.url + "/v1", "fake-llm", timeout_s=30)
    try:
        messages = [{"role": "user", "content": "How do I dispute a card transaction?"}]
        completion = await client.complete(messages, GenerationOptions(max_tokens=64))
        assert completion.text == ANSWER
        streamed = [d async for d in client.stream(messages, GenerationOptions(max_tokens=64))]
        assert len(streamed) > 10 and "".join(streamed) == ANSWER
    finally:
        await client.aclose()


async def test_fake_backend_answers_llama_guard_prompts_like_a_safe_verdict(fake_llm: Child) -> None:
    backend = OpenAICompatClient(fake_llm.url + "/v1", "llama-guard", timeout_s=30)
    try:
        judge = LlamaGuardClient(backend, [SafetyCategory("S1", "Violent Crimes")])
        verdict = await judge.check([("User", "How do I reset my PIN?")])
        assert verdict.safe and verdict.raw == "safe"
    finally:
        await backend.aclose()
    assert reply_for("Question: Should the user message be blocked (Yes or No)?") == "No"


async def test_loadgen_closed_loop_against_the_backend(fake_llm: Child) -> None:
    result = await run_load(fake_llm.url, kind="backend", concurrency=2, duration_s=0.5, warmup_s=0.1)
    assert result.ok and not result.errors
    assert all(s.answer_chars == len(ANSWER) for s in result.ok)
    # The configured 30 ms first-token delay is paid by every request.
    assert min(s.latency_ms for s in result.ok) >= 30


def test_summaries_and_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0
    stats = summarize(values)
    assert stats["n"] == 100 and stats["max"] == 100.0 and stats["mean"] == 50.5
    assert summarize([])["p50"] == 0.0


def test_apply_quick_only_touches_defaults() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args(["--duration", "7"])
    apply_quick(args, parser, chunks=300, duration=2.0)
    assert args.chunks == 300 and args.duration == 7.0


def test_batching_embedder_matches_the_wrapped_model_and_batches_concurrent_callers(embedder) -> None:  # type: ignore[no-untyped-def]
    batching = BatchingEmbedder(embedder, max_batch=16)
    texts = [f"How do I order new checks for account {i}?" for i in range(12)]
    expected = embedder.embed(texts)
    np.testing.assert_allclose(batching.embed(texts[:3]), expected[:3], atol=1e-5)
    assert batching.embed([]).shape == (0, embedder.dim)

    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(texts))

    def call(i: int) -> None:
        barrier.wait()
        results[i] = batching.embed([texts[i]])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    passes_before = batching.passes
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(len(texts)):
        np.testing.assert_allclose(results[i][0], expected[i], atol=1e-5)
    # 12 simultaneous single-text callers must not need 12 forward passes.
    assert batching.passes - passes_before < len(texts)


def test_batching_embedder_hands_a_failure_to_every_caller_of_the_pass() -> None:
    class Broken:
        dim = 4

        def embed(self, texts: list[str]) -> np.ndarray:
            raise RuntimeError("model crashed")

    batching = BatchingEmbedder(Broken())
    with pytest.raises(RuntimeError, match="model crashed"):
        batching.embed(["a"])
    with pytest.raises(RuntimeError, match="model crashed"):  # and the embedder is not left stuck
        batching.embed(["b"])


async def test_batching_embedder_from_event_loop_threads(embedder) -> None:  # type: ignore[no-untyped-def]
    batching = BatchingEmbedder(embedder)
    outs = await asyncio.gather(*(asyncio.to_thread(batching.embed, [f"question {i}"]) for i in range(6)))
    assert all(o.shape == (1, embedder.dim) for o in outs)


def test_faiss_bench_measures_recall_on_both_index_kinds() -> None:
    from bench.faiss_bench import bench_size

    flat = bench_size(1000, 20, [96])
    assert flat[0]["kind"] == "flat" and flat[0]["recall_at_10"] == 1.0
    hnsw = bench_size(1000, 20, [8, 64], exact_max=500)
    assert [r["kind"] for r in hnsw] == ["hnsw", "hnsw"]
    assert 0.0 < hnsw[0]["recall_at_10"] <= hnsw[1]["recall_at_10"] <= 1.0


def test_hot_spots_from_a_raw_profile(tmp_path: Path) -> None:
    from bench.profiling import hot_spots

    raw = tmp_path / "profile.txt"
    raw.write_text(
        "main (app.py:1);embed (/work/main/app/rag/embedder.py:40);forward (site-packages/torch/nn/linear.py:9) 30\n"
        "main (app.py:1);check (/work/main/app/guard/rails.py:120) 10\n"
    )
    spots = hot_spots(raw)
    assert spots["self"][0] == ("forward (torch/nn/linear.py)", 75.0)
    assert ("main (app.py)", 100.0) in spots["inclusive"]


def test_synthetic_corpus_has_about_the_requested_chunks(tmp_path: Path) -> None:
    from app.rag.chunking import chunk_document
    from app.rag.loaders import load_document
    from bench.corpus import write_documents

    write_documents(tmp_path, 400)
    chunks = sum(len(chunk_document(load_document(p), p.stem, p.name, chunk_chars=900, overlap=120))
                 for p in tmp_path.glob("*.md"))
    assert 300 <= chunks <= 500


def test_grounded_fake_answer_restates_source_one_and_passes_the_real_groundedness_rail_by_wording() -> None:
    from app.rag.base import Chunk
    from app.rag.chain import build_messages, extract_citations
    from app.rag.grounding import check_groundedness
    from bench.fake_backends import grounded_answer

    chunks = [
        Chunk(id="a", document_id="fees", source="fees.md", title="Fees", section="Wires",
              content="Outgoing domestic wires cost $25 each. They must be sent before 4 pm Eastern. More text."),
        Chunk(id="b", document_id="cards", source="cards.md", title="Cards", content="Replacement cards are free."),
    ]
    prompt = build_messages("What does a wire cost?", [], chunks, system_prompt="You help.", context_tokens=500)
    text = "\n".join(m["content"] for m in prompt.messages)
    answer = grounded_answer(text)
    assert answer == "Outgoing domestic wires cost $25 each [1]. They must be sent before 4 pm Eastern [1]."
    assert [c["document_id"] for c in extract_citations(answer, prompt.sources)] == ["fees"]

    class NoModel:  # the wording alone must decide: any embedding call fails the test
        dim = 384

        def embed(self, texts: list[str]) -> None:
            raise AssertionError(f"embedded {texts}")

    result = check_groundedness(answer, chunks, NoModel())  # type: ignore[arg-type]
    assert result.verdict == "allow" and "by wording" in (result.detail or "")
    assert grounded_answer("no sources in this prompt") is None
    assert reply_for("no sources", grounded=True) == ANSWER
