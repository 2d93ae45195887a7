"""TurnRunner end to end on real parts: a Redis session store, MiniLM, and an LLM server speaking the OpenAI
streaming wire (a local stand-in: these tests are about the pipeline, not the model)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.responses import StreamingResponse

from app.guard.base import GuardDecision, RailResult
from app.llm.client import OpenAICompatClient
from app.pipeline.turn import TurnRequest, TurnRunner
from app.pipeline.turn_types import Delta
from app.rag.ingest import ingest
from app.rag.retrieve import HybridRetriever
from app.sessions.redis import SessionBusy
from app.settings import Settings
from app.state import AppState, LiveRails, LoadedRails
from tests.admin.helpers import BASE_FILES, BlockedWordsGuard, initial_live
from tests.fixtures.redis import StoreFactory
from tests.llm import wire
from tests.rag.conftest import CORPUS, make_settings, write_corpus

QUESTION = "How do I freeze my card?"


def pipeline_state(settings: Settings, llm: Any, store: Any, embedder: Any, retriever: Any = None) -> AppState:
    """Real parts around the turn: the given store, embedder and LLM client; the blocked-words test guard."""
    return AppState(
        settings=settings, llm=llm, store=store, embedder=embedder, retriever=retriever, rails=initial_live()
    )


class LockRecordingStore:
    """The real Redis store, noting when a turn lets go of a session's lock."""

    def __init__(self, inner: Any, events: list[str]) -> None:
        self._inner, self._events = inner, events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @asynccontextmanager
    async def open_turn(self, session_id: str, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async with self._inner.open_turn(session_id, **kwargs) as held:
                yield held
        finally:
            self._events.append("lock released")


async def test_run_releases_the_session_lock_before_it_returns(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """`run()` stops at the Done event; the turn's generator (which holds the session lock) must be closed
    then, not whenever it is garbage-collected: the same client's next turn would find the lock still held
    and wait a poll interval (50 ms) for its own finished turn."""

    async def handler(request, body):
        return wire.stream_response(wire.sse(["Open ", "Cards ", "and ", "tap ", "Freeze."]))

    events: list[str] = []
    store = LockRecordingStore(redis_store_factory(), events)
    impatient = redis_store_factory(lock_wait_s=0.01, lock_poll_s=0.005)  # same keys, gives up at once
    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(Settings(data_dir=tmp_path, rag_enabled=False), llm, store, embedder)
        try:
            session = await store.create()
            runner = TurnRunner(state)
            for n in range(3):
                messages = [{"role": "user", "content": f"{QUESTION} ({n})"}]
                result = await runner.run(TurnRequest(messages=messages, session_id=session.id))
                events.append("run returned")
                assert result.answer == "Open Cards and tap Freeze." and not result.blocked
                try:
                    async with impatient.lock(session.id):
                        pass
                except SessionBusy:
                    raise AssertionError(f"turn {n} returned while still holding the session lock") from None
            assert events == ["lock released", "run returned"] * 3
            assert [t.user for t in await store.history(session.id)] == [f"{QUESTION} ({n})" for n in range(3)]
        finally:
            await llm.aclose()


class RecordingEmbedder:
    """The real MiniLM, noting each call's texts (called from worker threads)."""

    def __init__(self, inner: Any, events: list[Any]) -> None:
        self._inner, self._events, self.dim = inner, events, inner.dim
        self.started = threading.Event()

    def embed(self, texts: list[str]) -> Any:
        self._events.append(("embed", tuple(texts)))
        self.started.set()
        return self._inner.embed(texts)


class HistoryWaitsForEmbedding:
    """The real Redis store whose history read notes whether the query embedding had already started."""

    def __init__(self, inner: Any, embedder: RecordingEmbedder, events: list[Any]) -> None:
        self._inner, self._embedder, self._events = inner, embedder, events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @asynccontextmanager
    async def open_turn(self, session_id: str, **kwargs: Any) -> AsyncIterator[Any]:
        started = await asyncio.to_thread(self._embedder.started.wait, 2.0)
        self._events.append(("history", started))
        self._embedder.started.clear()
        async with self._inner.open_turn(session_id, **kwargs) as held:
            yield held


async def test_a_standalone_question_is_embedded_while_the_session_loads(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """A question that cannot be a follow-up is its own retrieval query, so its embedding overlaps the history
    read; a follow-up ("and that one?") waits for the history, then its text and its rewritten query are
    embedded in one call."""

    async def handler(request, body):
        return wire.stream_response(wire.sse(["Open ", "Cards ", "and ", "tap ", "Freeze."]))

    standalone = "How do I freeze my debit card from the mobile app?"  # > 6 words, no pronoun: not a follow-up
    events: list[Any] = []
    recording = RecordingEmbedder(embedder, events)
    store = HistoryWaitsForEmbedding(redis_store_factory(), recording, events)
    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(
            Settings(data_dir=tmp_path, rag_enabled=False, query_rewrite="join"), llm, store, recording
        )
        try:
            session = await store.create()
            runner = TurnRunner(state)
            for question in (standalone, "and that one?"):
                messages = [{"role": "user", "content": question}]
                result = await runner.run(TurnRequest(messages=messages, session_id=session.id))
                assert not result.blocked
        finally:
            await llm.aclose()
    turn_events = [e for e in events if e[0] == "history" or e[1][0] in (standalone, "and that one?")]
    assert turn_events == [
        ("embed", (standalone,)),
        ("history", True),
        ("history", False),  # the follow-up's embedding waited for the history (2 s timeout)
        ("embed", ("and that one?", f"{standalone} and that one?")),
    ]


async def test_an_output_rail_block_stops_generation(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """Once an output window is blocked nothing more of the answer can be shown, so the LLM request is closed at
    once (the backend stops generating) instead of streaming on to max_tokens in the background."""
    sent: list[int] = []
    stopped = threading.Event()
    words = ["The ", "bomb ", "squad ", *[f"word{i} " for i in range(200)]]  # "bomb" is the blocked word

    async def handler(request, body):
        async def generate() -> AsyncIterator[str]:
            try:
                for index, event in enumerate(wire.sse(words)):
                    yield event
                    sent.append(index)
                    await asyncio.sleep(0.02)
            finally:
                stopped.set()

        return StreamingResponse(generate(), media_type="text/event-stream")

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(Settings(data_dir=tmp_path, rag_enabled=False), llm, redis_store_factory(), embedder)
        try:
            result = await TurnRunner(state).run(TurnRequest(messages=[{"role": "user", "content": QUESTION}]))
            assert result.blocked and result.status == "blocked"
            assert await asyncio.to_thread(stopped.wait, 2.0), "the LLM kept streaming after the block"
            assert len(sent) < 100  # 200+ events at 20 ms each would take over 4 s
        finally:
            await llm.aclose()


async def test_an_answer_without_citations_gets_the_sources_that_support_it(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """Small models often drop the [n] the prompt asks for. The sources that support the answer by wording are
    then cited after it; an answer the sources do not support gets no citation."""
    settings = make_settings(tmp_path)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    answers = [
        "Outgoing domestic wire transfers cost $25 each and must be submitted before 4 pm Eastern.",
        "Wires are free on Sundays for every customer.",
    ]

    async def handler(request, body):
        return wire.stream_response(wire.sse([answers.pop(0)]))

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(settings, llm, redis_store_factory(), embedder, HybridRetriever(settings))
        try:
            question = [{"role": "user", "content": "How much does an outgoing domestic wire transfer cost?"}]
            supported = await TurnRunner(state).run(TurnRequest(messages=question))
            invented = await TurnRunner(state).run(TurnRequest(messages=question))
        finally:
            await llm.aclose()
    assert supported.answer.endswith("Eastern. [1]"), supported.answer
    assert [c["document_id"] for c in supported.citations] == ["wires"]
    assert supported.trace["citations"] == "attributed by wording"
    assert invented.answer == "Wires are free on Sundays for every customer." and invented.citations == []


async def test_model_time_covers_the_llm_request_and_the_query_embedding(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """`timings_ms.model` is the part of the turn spent waiting on models: here an LLM that stalls 300 ms
    before its first token, and the query embedding. What is left is the pipeline's own time."""

    async def handler(request, body):
        return wire.stream_response(wire.sse(["Open ", "Cards."]), delay_after=0, delay_s=0.3)

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        store = redis_store_factory()
        state = pipeline_state(Settings(data_dir=tmp_path, rag_enabled=False), llm, store, embedder)
        try:
            session = await store.create()
            request = TurnRequest(messages=[{"role": "user", "content": QUESTION}], session_id=session.id)
            result = await TurnRunner(state).run(request)
        finally:
            await llm.aclose()
    timings = result.timings_ms
    assert result.answer == "Open Cards."
    assert timings["model"] >= 300 + 0.9 * timings["embed"] - 1  # the embedding overlaps the session load
    assert timings["model"] <= timings["total"]
    assert timings["total"] - timings["model"] < 100  # no stall outside the model was counted as model time


class LlmFirstCheckingGuard(BlockedWordsGuard):
    """The blocked-words guard whose input check first waits (blocking the event loop, as CPU-bound rails work
    does) to see whether the speculative LLM request has already reached the backend."""

    def __init__(self, files: dict[str, str], request_seen: threading.Event) -> None:
        super().__init__(files)
        self.request_seen = request_seen
        self.seen_before_rails: list[bool] = []

    async def check_input(self, messages: list[dict[str, str]], embedding: Any = None) -> Any:
        self.seen_before_rails.append(self.request_seen.wait(0.5))
        return await super().check_input(messages, embedding)


async def test_the_speculative_llm_request_goes_out_before_the_input_rails_work(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """Generation starts before the input rails finish; its request must also be *sent* before their CPU work
    occupies the event loop, or the rails' time adds to the time to first token."""
    request_seen = threading.Event()

    async def handler(request, body):
        request_seen.set()
        return wire.stream_response(wire.sse(["Open ", "Cards."]))

    guard = LlmFirstCheckingGuard(dict(BASE_FILES), request_seen)
    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(Settings(data_dir=tmp_path, rag_enabled=False), llm, redis_store_factory(), embedder)
        state.rails = LiveRails(LoadedRails("test", guard, dict(BASE_FILES)))
        try:
            for _ in range(2):  # the first turn also opens the pooled connection (a real wait); the second is typical
                request_seen.clear()
                result = await TurnRunner(state).run(TurnRequest(messages=[{"role": "user", "content": QUESTION}]))
                assert result.answer == "Open Cards." and not result.blocked
        finally:
            await llm.aclose()
    assert guard.seen_before_rails[-1] is True


@pytest.mark.parametrize("question", ["And what was my name?", "in short?"])
async def test_a_question_about_the_conversation_is_answered_from_the_history(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path, question: str
) -> None:
    """"What was my name?" is no knowledge-base question: the LLM gets the earlier turns and an instruction to
    answer from them, instead of the turn saying "I don't know". "in short?" matches no phrase: the nearest
    examples recognise it (app/pipeline/conversation_intent.py)."""
    settings = make_settings(tmp_path)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    prompts: list[list[dict[str, str]]] = []

    async def handler(request, body):
        prompts.append(body["messages"])
        return wire.stream_response(wire.sse(["Your name is Ada."]))

    history = [
        {"role": "user", "content": "Hello! My name is Ada. How do I freeze my card?"},
        {"role": "assistant", "content": "Open the app and tap Freeze card [1]."},
    ]
    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(settings, llm, redis_store_factory(), embedder, HybridRetriever(settings))
        try:
            about = await TurnRunner(state).run(
                TurnRequest(messages=[*history, {"role": "user", "content": question}]))
            alone = await TurnRunner(state).run(
                TurnRequest(messages=[{"role": "user", "content": "What was my name?"}]))
        finally:
            await llm.aclose()
    assert about.answer == "Your name is Ada." and about.trace["answered_from"] == "conversation", about.trace
    [prompt] = prompts
    assert "about this conversation itself" in prompt[0]["content"]
    [asked] = prompt[1:]  # the earlier turns as a transcript, then the question
    assert all(m["content"] in asked["content"] for m in history) and asked["content"].endswith(question)
    assert "Sources" not in prompt[0]["content"]  # the knowledge base is not what answers it
    assert alone.answer == state.rails.current.guard.texts.idk  # no history: nothing to answer from


async def test_a_name_the_customer_never_gave_is_not_stated_as_theirs(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """Asked "what's my name?" by a customer who never said it, the 1.5B model answered "Your name is Larkspur
    Bank.": a name none of the customer's messages holds becomes "you haven't told me"; one they gave stays."""
    from app.pipeline.conversation import NAME_INSTRUCTION, NO_NAME

    settings = make_settings(tmp_path)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    prompts: list[list[dict[str, str]]] = []

    async def handler(request, body):
        prompts.append(body["messages"])
        return wire.stream_response(wire.sse(["Your name ", "is Larkspur ", "Bank."]))

    def dialogue(first: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": first}, {"role": "assistant", "content": "Open the app [1]."},
                {"role": "user", "content": "what's my name?"}]

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(settings, llm, redis_store_factory(), embedder, HybridRetriever(settings))
        try:
            never_said = await TurnRunner(state).run(TurnRequest(messages=dialogue("How do I freeze my card?")))
            said = await TurnRunner(state).run(TurnRequest(messages=dialogue("hi its larkspur, card frozen?")))
        finally:
            await llm.aclose()
    assert never_said.answer == NO_NAME and not never_said.blocked
    assert said.answer == "Your name is Larkspur Bank."  # the customer's own word: not ours to doubt
    assert all(NAME_INSTRUCTION in prompt[0]["content"] for prompt in prompts) and len(prompts) == 2


async def test_nothing_relevant_retrieved_answers_i_dont_know_at_once_but_greetings_get_a_reply(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """No source above the relevance bar: the configured "I don't know" with no LLM request at all (issue 18,
    item 8). A greeting finds no source either, and is answered, not "I don't know"-ed."""
    settings = make_settings(tmp_path)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    prompts: list[list[dict[str, str]]] = []

    async def handler(request, body):
        prompts.append(body["messages"])
        return wire.stream_response(wire.sse(["Hello! ", "How can I help?"]))

    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(settings, llm, redis_store_factory(), embedder, HybridRetriever(settings))
        try:
            unknown = await TurnRunner(state).run(
                TurnRequest(messages=[{"role": "user", "content": "Who won the 1998 football world cup final?"}]))
            assert prompts == []  # the LLM was never asked
            hello = await TurnRunner(state).run(TurnRequest(messages=[{"role": "user", "content": "Hi there!"}]))
        finally:
            await llm.aclose()
    idk = state.rails.current.guard.texts.idk
    assert unknown.answer == idk and unknown.trace["answered_from"] == "no_sources" and not unknown.blocked
    assert unknown.trace["retrieval"]["chunks"] == [] and "generate" not in unknown.timings_ms
    assert hello.answer == "Hello! How can I help?" and hello.trace["answered_from"] == "small_talk"
    [prompt] = prompts
    assert "greeting" in prompt[0]["content"] and "Sources" not in prompt[0]["content"]


async def test_a_follow_up_searches_with_the_earlier_subject_and_a_new_topic_alone(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """Issue 18, item 2: "And how long does it take to arrive?" after the international wire fee retrieves the wire
    article; a short question on a new subject is not searched under the old one."""
    settings = make_settings(tmp_path)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)

    async def handler(request, body):
        return wire.stream_response(wire.sse(["See [1]."]))

    first = [{"role": "user", "content": "How much does an international wire transfer cost?"},
             {"role": "assistant", "content": "An outgoing international wire costs $45 [1]."}]
    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(settings, llm, redis_store_factory(), embedder, HybridRetriever(settings))
        try:
            follow = await TurnRunner(state).run(TurnRequest(
                messages=[*first, {"role": "user", "content": "And how long does it take to arrive?"}]))
            switch = await TurnRunner(state).run(TurnRequest(
                messages=[*first, {"role": "user", "content": "how do i lock my debit card"}]))
        finally:
            await llm.aclose()
    assert follow.trace["rewrite"]["query"].startswith("How much does an international wire")
    assert follow.trace["retrieval"]["chunks"][0]["document_id"] == "wires"
    assert switch.trace["rewrite"]["implicit"] and "question alone" in switch.trace["rewrite"]["searched"]
    assert switch.trace["retrieval"]["chunks"][0]["document_id"] == "cards", switch.trace


class FactsBlockingGuard(BlockedWordsGuard):
    """The blocked-words guard plus a stand-in for the shipped facts rail (tests/guard/test_groundedness_rail.py
    checks the real one blocks as `groundedness` with the "I don't know" text): "$99" is a figure no source holds."""

    grounding_blocks = True

    def __init__(self, files: dict[str, str]) -> None:
        super().__init__(files)
        self.window_checked = threading.Event()  # the stand-in LLM holds the rest of its answer until then

    async def check_output(
        self, messages: list[dict[str, str]], answer: str, context: list[str] | None = None
    ) -> GuardDecision:
        self.window_checked.set()
        if "$99" in answer:
            rail = RailResult("groundedness", "block", detail="unsupported facts: $99")
            return GuardDecision(False, [rail], blocked_by="groundedness", refusal=self.texts.idk)
        return await super().check_output(messages, answer, context)


async def test_a_groundedness_block_replaces_the_answer_and_a_safety_block_keeps_what_was_shown(
    redis_store_factory: StoreFactory, embedder, tmp_path: Path
) -> None:
    """Streaming releases the first token at once ("An"); when a later window states a figure no source holds,
    the answer is replaced by "I don't know": the saved turn (what a follow-up reads) and the final render must
    not begin with "An". A safety block ends the stream after text that passed the rails, which stays."""
    settings = make_settings(tmp_path)
    ingest(write_corpus(settings.knowledge_dir, CORPUS), settings, embedder=embedder, progress=False)
    answers = [["An", " outgoing", " wire", " costs", " $99", " today."], ["The ", "bomb ", "squad ", "came."]]

    guard = FactsBlockingGuard(BASE_FILES)

    async def handler(request, body):
        guard.window_checked.clear()

        async def generate() -> AsyncIterator[str]:
            first, *rest = wire.sse(answers.pop(0), pings=False)  # the first event carries the first token
            yield first
            # As a slow model streams: the first token is checked (and shown) alone before the rest arrives, on any
            # machine — a turn that found the whole answer there would check it in one window.
            await asyncio.to_thread(guard.window_checked.wait, 30)
            for event in rest:
                yield event

        return StreamingResponse(generate(), media_type="text/event-stream")

    store = redis_store_factory()
    with wire.serve({("POST", "/v1/chat/completions"): handler}) as server:
        llm = OpenAICompatClient(server.base_url, "m")
        state = pipeline_state(settings, llm, store, embedder, HybridRetriever(settings))
        state.rails = LiveRails(LoadedRails("disk", guard, BASE_FILES))
        idk, refusal = state.rails.current.guard.texts.idk, state.rails.current.guard.texts.refusal
        try:
            session = await store.create()
            question = "How much does an outgoing domestic wire transfer cost?"
            streamed: list[str] = []
            runner = TurnRunner(state)
            async for event in runner.events(
                TurnRequest(messages=[{"role": "user", "content": question}], session_id=session.id)
            ):
                if isinstance(event, Delta):
                    streamed.append(event.text)
                else:
                    invented = event.result
            unsafe = await runner.run(TurnRequest(messages=[{"role": "user", "content": QUESTION}]))
            saved = await store.history(session.id)
        finally:
            await llm.aclose()
    assert streamed[0] == "An" and streamed[-1] == f"\n\n{idk}"  # a stream cannot take back a token
    assert invented.blocked and invented.trace["blocked_by"] == "groundedness"
    assert invented.answer == idk and [t.answer for t in saved] == [idk]
    assert unsafe.blocked and unsafe.answer.startswith("The ") and unsafe.answer.endswith(f"\n\n{refusal}")
