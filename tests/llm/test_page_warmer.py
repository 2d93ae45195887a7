"""The answer-page warmer against the real embedded llama.cpp server (SmolLM2-135M): a page it read is restored
from llama.cpp's prompt cache (its own `timings` say how many prompt tokens were reused), it never reads while a
turn runs, and the turn uses a page only once it is warm (app/llm/page_warmer.py, app/pipeline/answer_pages.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.llm.llamacpp import LlamaCppClient
from app.llm.page_warmer import PageWarmer, WarmJob, warm_job
from app.main import create_app
from app.pipeline import context
from app.pipeline.answer_pages import page_book, page_key, plan_warmup
from app.rag.chain import page_instructions
from app.rag.ingest import ingest
from app.rag.pages import page_prefix
from app.rag.retrieve import HybridRetriever
from app.sessions.memory import MemorySessionStore
from app.settings import Settings
from app.state import AppState
from tests.fixtures.llm import TEST_MODEL
from tests.pipeline.test_turn import pipeline_state
from tests.rag.conftest import CORPUS, make_settings, write_corpus

BLOCKS = [f"[{n}] Fees — part {n}\n" + " ".join(f"Item {n}.{i} costs ${n * 10 + i}." for i in range(12))
          for n in (1, 2)]
HEAD = "You answer from the sources.\n\nSources:\n\n"


async def _reused_tokens(base_url: str, system: str) -> tuple[int, int]:
    body = {"model": TEST_MODEL, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Which item costs $15?"}]}
    async with httpx.AsyncClient(timeout=120) as client:
        timings = (await client.post(f"{base_url}/chat/completions", json=body)).json()["timings"]
    return int(timings["prompt_n"]), int(timings["cache_n"])


async def _read(warmer: PageWarmer, job: WarmJob) -> None:
    """Reads one page with the warmer's background task, then stops it."""
    warmer.want(job)
    warmer.start()
    try:
        assert await warmer.wait_until_warm(timeout_s=120)
    finally:
        await warmer.stop()


async def test_a_warmed_page_is_read_from_the_prompt_cache(embedded_llm_url: str) -> None:
    warmer = PageWarmer(embedded_llm_url, TEST_MODEL, cache_mib=256)
    job = warm_job("fees-page", HEAD, BLOCKS, tokens=200, step_tokens=40)
    assert len(job.steps) == 2 and job.steps[-1] == HEAD + "\n\n".join(BLOCKS)  # read in two steps
    # A prompt in between: the page must come back from the host-memory cache, not from the slot it was read in.
    await _reused_tokens(embedded_llm_url, "Something else entirely. " * 20)
    await _read(warmer, job)
    assert warmer.is_warm("fees-page") and warmer.progress() == {"warm": 1, "pending": 0, "failures": 0}
    for _ in range(3):  # fill both slots with other prompts
        await _reused_tokens(embedded_llm_url, "Another unrelated prompt about weather. " * 15)
    read, reused = await _reused_tokens(embedded_llm_url, job.steps[-1] + "\n\n[3] Extra\nNot cached.")
    assert reused >= 150 and read < 40, (read, reused)


async def test_nothing_is_read_while_a_turn_runs(embedded_llm_url: str) -> None:
    warmer = PageWarmer(embedded_llm_url, TEST_MODEL, cache_mib=256)
    warmer.start()
    try:
        with warmer.busy():
            warmer.want(warm_job("held", HEAD, BLOCKS[:1], tokens=100))
            await asyncio.sleep(1.5)
            assert warmer.progress()["pending"] == 1 and not warmer.is_warm("held")
        assert await warmer.wait_until_warm(timeout_s=120)
        assert warmer.is_warm("held")
    finally:
        await warmer.stop()


def test_pages_beyond_the_cache_are_forgotten_oldest_first() -> None:
    warmer = PageWarmer("http://127.0.0.1:9", "m", cache_mib=64)  # half of 64 MiB at 32 KiB a token: 1,024 tokens
    for key in ("a", "b", "c"):
        warmer._remember(key, 400)
    assert not warmer.is_warm("a") and warmer.is_warm("c") and warmer.is_warm("b")
    warmer._remember("d", 400)  # "b" was asked after "c": "c" is now the oldest
    assert warmer.is_warm("b") and not warmer.is_warm("c") and warmer.is_warm("d")
    warmer.want(WarmJob("b", ("x",), 400))  # already warm: nothing to read
    assert warmer.idle


async def test_a_turn_uses_the_page_once_it_is_warm(embedded_llm_url: str, embedder, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rag_context_mode="pages", rag_context_tokens=400)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    llm = LlamaCppClient(embedded_llm_url, TEST_MODEL, timeout_s=60)
    state = pipeline_state(settings, llm, None, embedder, HybridRetriever(settings))
    warmer = state.page_warmer = PageWarmer(embedded_llm_url, TEST_MODEL, cache_mib=256)
    texts = state.rails.current.guard.texts
    question = "How much does an outgoing domestic wire transfer cost?"
    assert state.retriever is not None
    sources = await state.retriever.retrieve(question, embedder.embed([question])[0], 3)
    page = page_book(state.retriever.snapshot, 400).page_of(sources[0])
    assert page is not None and page.document_id == sources[0].document_id
    try:
        trace: dict[str, object] = {}
        messages, used = context.build_prompt(state, question, [], sources, texts, True, trace=trace)
        assert trace["context"] == "passages (page not cached yet)" and messages is not None
        assert not messages[0]["content"].endswith(page.text)
        assert warmer.progress()["pending"] == 1  # the page is queued
        warmer.start()
        assert await warmer.wait_until_warm(timeout_s=300)
        assert warmer.is_warm(page_key(texts, page))
        messages, used = context.build_prompt(state, question, [], sources, texts, True, trace=trace)
        assert messages is not None and trace["context"] == f"page {page.document_id} #1"
        head = page_prefix(page_instructions(texts.system_prompt, texts.idk), page)
        assert messages[0]["content"] == head and [c.id for c in used] == [c.id for c in page.chunks]
        read, reused = await _reused_tokens(embedded_llm_url, head)
        assert reused > read, (read, reused)
        await warmer.stop()
        # At start every page of the index is queued (the warm one is not read again).
        book = page_book(state.retriever.snapshot, 400)
        assert plan_warmup(state, warmer) == len(book) > 1
        assert warmer.progress()["pending"] == len(book) - 1
    finally:
        await warmer.stop()
        await llm.aclose()


def test_the_server_reads_every_page_after_start_and_says_how_far_it_got(
    embedded_llm_url: str, embedder, tmp_path: Path
) -> None:
    """The lifespan queues the index's pages and reads them in the background; /readyz reports the progress
    (bench/answer_ttft.py waits on it) and never waits for it."""
    settings = make_settings(tmp_path, rag_context_mode="pages", rag_context_tokens=400, ui_enabled=False,
                             redis_url=None)  # fmt: skip
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    pages = len(page_book(HybridRetriever(settings).snapshot, 400))

    async def state_factory(settings: Settings) -> AppState:
        llm = LlamaCppClient(embedded_llm_url, TEST_MODEL)
        store = MemorySessionStore(ttl_s=60, max_turns=10)
        state = pipeline_state(settings, llm, store, embedder, HybridRetriever(settings))
        state.page_warmer = PageWarmer(embedded_llm_url, TEST_MODEL, cache_mib=256)
        return state

    with TestClient(create_app(settings, state_factory=state_factory)) as client:
        first = client.get("/readyz").json()
        assert first["status"] == "ready" and first["answer_pages"]["warm"] < pages
        deadline = time.monotonic() + 300
        while client.get("/readyz").json()["answer_pages"]["warm"] < pages and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.get("/readyz").json()["answer_pages"] == {"warm": pages, "pending": 0, "failures": 0}


async def test_a_page_is_found_in_the_cache_after_a_question_about_the_conversation(embedded_llm_url: str) -> None:
    """A question about the conversation is answered from a short prompt that shares the system prompt with the
    pages. llama.cpp's default slot choice reused that slot (similar enough) without looking in its prompt cache,
    and the next page was read in full; EmbeddedLLMServer's slot_prompt_similarity (0.5) makes it look."""
    system = "You are the support assistant of a bank. " * 12  # ~120 tokens every prompt starts with
    head = f"{system}\n\nSources:\n\n"
    job = warm_job("after-conversation", head, BLOCKS, tokens=200)
    await _read(PageWarmer(embedded_llm_url, TEST_MODEL, cache_mib=256), job)
    await _reused_tokens(embedded_llm_url, f"{system}\n\nOur conversation so far: (nothing yet)")
    await _reused_tokens(embedded_llm_url, "An unrelated prompt about the weather in spring. " * 10)
    read, reused = await _reused_tokens(embedded_llm_url, job.steps[-1])
    assert read < 40 and reused >= 250, (read, reused)


def test_without_the_bulk_warm_up_a_page_a_turn_asked_for_is_still_read(
    embedded_llm_url: str, embedder, tmp_path: Path
) -> None:
    """rag_warm_pages off: nothing is queued at start, but the reader runs, so a page a turn queued gets read."""
    settings = make_settings(tmp_path, rag_context_mode="pages", rag_context_tokens=400, rag_warm_pages=False,
                             ui_enabled=False, redis_url=None)  # fmt: skip
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    warmer = PageWarmer(embedded_llm_url, TEST_MODEL, cache_mib=256)
    warmer.want(warm_job("asked-for", HEAD, BLOCKS[:1], tokens=100))  # as a turn on a cold page would

    async def state_factory(settings: Settings) -> AppState:
        llm = LlamaCppClient(embedded_llm_url, TEST_MODEL)
        state = pipeline_state(settings, llm, MemorySessionStore(ttl_s=60, max_turns=10), embedder,
                               HybridRetriever(settings))  # fmt: skip
        state.page_warmer = warmer
        return state

    with TestClient(create_app(settings, state_factory=state_factory)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").json()["answer_pages"]["warm"] < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.get("/readyz").json()["answer_pages"] == {"warm": 1, "pending": 0, "failures": 0}
