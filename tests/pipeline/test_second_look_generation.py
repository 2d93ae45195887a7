"""The second look in SpeculativeGeneration and through a whole turn, on the real embedded LLM (SmolLM2-135M).

The tiny model never says the configured "I don't know" text, so the tests make the text it does say (at temperature
0, where a stream repeats `complete`, tests/llm/test_client_embedded.py) the plan's "I don't know": the first answer
is then that text, exactly as the 1.5B model's copied line is in production."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.guard.base import AssistantTexts, GuardDecision
from app.llm.base import Completion, GenerationOptions, Usage
from app.llm.client import OpenAICompatClient
from app.llm.llamacpp import LlamaCppClient
from app.pipeline.generation import SpeculativeGeneration, continues_assistant
from app.pipeline.streaming import Finished, Released, hold_back
from app.pipeline.turn import TurnRequest, TurnRunner
from app.rag.base import Chunk
from app.rag.bm25 import Bm25Matrix
from app.rag.chain import DEFAULT_IDK, build_messages, extract_citations, prompt_passages
from app.rag.ingest import ingest
from app.rag.retrieve import HybridRetriever
from app.rag.second_look import Plan
from app.sessions.memory import MemorySessionStore
from app.state import AppState
from tests.admin.helpers import initial_live
from tests.fixtures.llm import TEST_MODEL
from tests.rag.conftest import CORPUS, make_settings, write_corpus

CHUNKS = [
    Chunk(id=f"{name}#0", document_id=name, source=name, title=name.split(".")[0].title(), content=text, score=0.6)
    for name, text in CORPUS.items()
]
IDF = Bm25Matrix.build([c.content for c in CHUNKS]).idf
QUESTION = "How much does an outgoing international wire cost?"
OPTIONS = GenerationOptions(max_tokens=24, temperature=0)


class RecordingLLM:
    """The real embedded client, noting each request's messages and the deltas it streamed back."""

    def __init__(self, inner: OpenAICompatClient, second: OpenAICompatClient | None = None) -> None:
        self.inner, self.second = inner, second
        self.model_name: str = inner.model_name
        self.continues_assistant = inner.continues_assistant  # llama.cpp continues a final assistant message
        self.calls: list[dict[str, Any]] = []

    async def complete(self, messages: list[dict[str, str]], options: GenerationOptions | None = None) -> Completion:
        return await self.inner.complete(messages, options)

    async def complete_prompt(self, prompt: str, options: GenerationOptions | None = None) -> Completion:
        return await self.inner.complete_prompt(prompt, options)

    async def health(self) -> None:
        await self.inner.health()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def stream(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions | None = None,
        *,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> AsyncIterator[str]:
        call: dict[str, Any] = {"messages": list(messages), "deltas": []}
        self.calls.append(call)
        client = self.second if self.second is not None and len(self.calls) > 1 else self.inner
        deltas = client.stream(messages, options, on_usage=on_usage)
        try:
            async for delta in deltas:
                call["deltas"].append(delta)
                yield delta
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]  # an async generator: stops the request now


def _prompt(question: str = QUESTION) -> tuple[list[dict[str, str]], list[Chunk]]:
    prepared = build_messages(
        question, [], CHUNKS, system_prompt="You are a bank support assistant.", context_tokens=400,
        idk_text=DEFAULT_IDK, fit="passages", idf=IDF,
    )  # fmt: skip
    return prepared.messages, prepared.sources


async def _shown(generation: SpeculativeGeneration, windows: list[str]) -> str:
    """What the customer would see: the generation through the output hold-back, every window checked."""

    async def check(window: str) -> GuardDecision:
        windows.append(window)
        return GuardDecision(True)

    shown = ""
    async for event in hold_back(generation.deltas(), check, chunk_chars=200, context_chars=400, first_chunk_chars=1):
        if isinstance(event, Released):
            shown += event.text
        elif isinstance(event, Finished):
            assert event.decision.allowed
    return shown


async def test_an_idk_with_a_covering_passage_is_answered_by_a_second_look(
    embedded_llm_client: OpenAICompatClient,
) -> None:
    messages, sources = _prompt()
    first = (await embedded_llm_client.complete(messages, OPTIONS)).text
    plan = Plan(first, QUESTION, prompt_passages(messages[0]["content"], sources), idf=IDF, min_coverage=0.3)
    llm = RecordingLLM(embedded_llm_client)
    generation = SpeculativeGeneration.start(llm, messages, OPTIONS, plan)
    windows: list[str] = []
    shown = await _shown(generation, windows)

    assert len(llm.calls) == 2
    said = "".join(llm.calls[0]["deltas"])  # the "I don't know", never shown: it stopped at its second sentence
    assert first.startswith(said) and said.strip()
    stop = plan.stop()
    assert stop is None or (said == first.split(stop)[0] and len(said) < len(first))
    again = llm.calls[1]["messages"]
    follow_up = {"role": "user", "content": plan.follow_up()}
    assert again == [*messages, {"role": "assistant", "content": said.strip()}, follow_up]
    wires = next(n for n, chunk in enumerate(sources, 1) if chunk.document_id == "wires.md")
    words = '"outgoing", "international", "wire" and "cost"'
    assert plan.follow_up().startswith(f"Source [{wires}] does talk about {words}.")
    second = "".join(llm.calls[1]["deltas"])
    if plan.record["outcome"] == "answered":
        assert shown == second and not windows[0].startswith(said)
    else:  # it kept to the "I don't know", or was about what no source says: the configured text in full
        assert plan.record["outcome"] in ("idk", "rejected") and shown == plan.idk
    assert shown.strip() and "".join(windows).endswith(shown[-20:])
    assert generation.completion_tokens >= len(llm.calls[0]["deltas"]) + len(llm.calls[1]["deltas"])  # both requests
    trace: dict[str, Any] = {}
    generation.note_trace(trace)
    assert trace.get("answered_from") == ("second_look" if plan.record["outcome"] == "answered" else None)
    record = trace["second_look"]
    assert record["ran"] and record["source"] == wires and record["coverage"] >= 0.3
    assert record["first_answer"] == said.strip() and record["ms"] > 0


async def test_on_llama_cpp_the_second_look_continues_an_answer_started_from_the_source(
    embedded_llm_client: OpenAICompatClient,
) -> None:
    """llama.cpp continues a final assistant message (its stream leaves that start out): the customer sees the lead
    and the model's continuation, with the source cited."""
    assert continues_assistant(embedded_llm_client)
    messages, sources = _prompt()
    first = (await embedded_llm_client.complete(messages, OPTIONS)).text
    plan = Plan(first, QUESTION, prompt_passages(messages[0]["content"], sources), idf=IDF, min_coverage=0.3,
                prefill=True)  # fmt: skip
    llm = RecordingLLM(embedded_llm_client)
    generation = SpeculativeGeneration.start(llm, messages, OPTIONS, plan)
    shown = await _shown(generation, [])
    assert len(llm.calls) == 2
    assert llm.calls[1]["messages"] == [*messages, {"role": "assistant", "content": plan.lead()}]
    continuation = "".join(llm.calls[1]["deltas"])
    assert continuation.strip() and not continuation.startswith(plan.lead())
    assert plan.record["lead"] == plan.lead()
    if plan.record["outcome"] == "answered":
        assert shown == plan.lead() + continuation
        assert extract_citations(shown, sources)[0]["document_id"] == "wires.md"
    else:
        assert shown == plan.idk


@pytest.mark.parametrize("case", ["gate closed", "not the idk text"])
async def test_otherwise_the_first_answer_is_shown_as_it_was(
    embedded_llm_client: OpenAICompatClient, case: str
) -> None:
    messages, sources = _prompt()
    first = (await embedded_llm_client.complete(messages, OPTIONS)).text
    passages = prompt_passages(messages[0]["content"], sources)
    if case == "gate closed":
        plan = Plan(first, QUESTION, passages, idf=IDF, min_coverage=1.01)
    else:
        plan = Plan("Zebras never file wire disputes.", QUESTION, passages, idf=IDF)
    llm = RecordingLLM(embedded_llm_client)
    generation = SpeculativeGeneration.start(llm, messages, OPTIONS, plan)
    assert await _shown(generation, []) == first
    assert len(llm.calls) == 1
    trace: dict[str, Any] = {}
    generation.note_trace(trace)
    assert "answered_from" not in trace
    if case == "gate closed":
        assert trace["second_look"]["skipped"].startswith("coverage ")
    else:
        assert "second_look" not in trace  # it never looked like the "I don't know" text


async def test_when_the_second_request_fails_the_first_answer_stands(embedded_llm_client: OpenAICompatClient) -> None:
    messages, sources = _prompt()
    first = (await embedded_llm_client.complete(messages, OPTIONS)).text
    plan = Plan(first, QUESTION, prompt_passages(messages[0]["content"], sources), idf=IDF, min_coverage=0.3)
    gone = LlamaCppClient("http://127.0.0.1:9/v1", TEST_MODEL, max_retries=0)  # nothing listens
    try:
        llm = RecordingLLM(embedded_llm_client, second=gone)
        generation = SpeculativeGeneration.start(llm, messages, OPTIONS, plan)
        assert await _shown(generation, []) == first
    finally:
        await gone.aclose()
    assert len(llm.calls) == 2 and plan.record["error"].startswith("LLMUnavailable")
    trace: dict[str, Any] = {}
    generation.note_trace(trace)
    assert "answered_from" not in trace and trace["second_look"]["ran"]


async def test_a_turn_records_its_second_look(
    embedded_llm_url: str, embedder: Any, tmp_path: Path
) -> None:
    """Through TurnRunner: retrieval, the real prompt, SmolLM2's own answer as the configured "I don't know", and the
    second look that the same answer then gets."""
    settings = make_settings(tmp_path, rag_top_k=3)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    llm = RecordingLLM(LlamaCppClient(embedded_llm_url, TEST_MODEL, timeout_s=60))
    rails = initial_live()
    guard = rails.current.guard
    state = AppState(settings=settings, llm=llm, store=MemorySessionStore(ttl_s=600, max_turns=10), embedder=embedder,
                     retriever=HybridRetriever(settings), rails=rails)  # fmt: skip
    request = TurnRequest(messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24)
    try:
        # The configured "I don't know" text becomes SmolLM2's own answer to a prompt that names it: found with the
        # second look on, since its first request (with a stop) need not decode like one without.
        state.settings = settings.model_copy(update={"rag_second_look": True, "rag_second_look_coverage": 0.3})
        answer = ""
        for _ in range(4):
            guard.texts = AssistantTexts(idk=answer.strip() or DEFAULT_IDK)
            llm.calls.clear()
            result = await TurnRunner(state).run(request)
            if (result.trace.get("second_look") or {}).get("ran"):
                break
            answer = result.answer
    finally:
        await llm.aclose()
    assert len(llm.calls) == 2, (guard.texts.idk, result.answer)
    record = result.trace["second_look"]
    assert result.trace.get("answered_from") == ("second_look" if record["outcome"] == "answered" else None)
    assert record["ran"] and guard.texts.idk.startswith(record["first_answer"])
    assert llm.calls[1]["messages"][-1] == {"role": "assistant", "content": record["lead"]}  # llama.cpp: prefilled
    if record["outcome"] == "answered":
        assert result.answer.startswith(record["lead"] + "".join(llm.calls[1]["deltas"]))  # (then citation markers)
    else:
        assert result.answer == guard.texts.idk
