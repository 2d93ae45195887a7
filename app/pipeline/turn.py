"""One chat turn as a pipeline of timed stages:

    load session → (embed once → input rails ‖ rewrite → retrieve) → generate → output rails → save

The stages are `TurnRunner` methods, each reading the turn's `TurnScope`: `_prepare` (rewrite and embed in
`_queries`, input rails ‖ retrieval, the prompt and speculative generation in `_start_generation`), `_stream` (the
answer through the output rails, window by window), `_answer` (refusal, or the answer with its citations) and
`_finish`, which builds the one `TurnResult` and saves it. Streaming and non-streaming share this path:
`TurnRunner.events()` yields `Delta`s and exactly one final `Done`; `TurnRunner.run()` consumes it. Generation
starts speculatively as soon as the prompt is ready, but its tokens are held until the input rails pass (and
cancelled when they block).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing, nullcontext
from typing import Any

import numpy as np

from app.guard.base import GuardDecision, RailResult
from app.llm.base import GenerationOptions
from app.observability import model_time, observe_turn
from app.pipeline import context
from app.pipeline.generation import SpeculativeGeneration, second_look_plan
from app.pipeline.streaming import TAIL_CHUNKS, Finished, Released, hold_back
from app.pipeline.turn_types import (
    Delta,
    Done,
    StreamedAnswer,
    Timer,
    TurnInputError,
    TurnRequest,
    TurnResult,
    TurnScope,
    history_messages,
    split_request,
)
from app.rag.base import Chunk
from app.sessions.base import OpenTurn, Turn
from app.state import AppState

# The turn's data types live in app/pipeline/turn_types.py; callers import them from here too.
__all__ = ["Delta", "Done", "Timer", "TurnInputError", "TurnRequest", "TurnResult", "TurnRunner"]

log = logging.getLogger(__name__)


def _cancel(task: asyncio.Future[Any] | None) -> None:
    """Drops a side task whose result is no longer wanted (its exception too, so asyncio does not log it)."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


class TurnRunner:
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def run(self, req: TurnRequest) -> TurnResult:
        events = self.events(req)
        try:
            async for event in events:
                if isinstance(event, Done):
                    return event.result
        finally:
            # Now, not whenever the abandoned generator is collected: closing it releases the session lock,
            # and the caller's next turn must not find its own finished turn still holding it.
            await events.aclose()
        raise RuntimeError("turn ended without a result")  # pragma: no cover - events() always ends with Done

    async def events(self, req: TurnRequest) -> AsyncGenerator[Delta | Done, None]:
        warmer = self.state.page_warmer
        # No answer page is read into the LLM's cache while a customer waits (app/llm/page_warmer.py). aclosing: the
        # turn (and its session lock) ends when this generator is closed, not when the collector finds it.
        with warmer.busy() if warmer is not None else nullcontext():
            async with aclosing(self._events(req)) as inner:
                async for event in inner:
                    yield event

    async def _events(self, req: TurnRequest) -> AsyncGenerator[Delta | Done, None]:
        prior, user_text = split_request(req.messages)
        in_prompt = self.state.settings.history_turns_in_prompt
        timer = Timer()
        timer.model_spans = model_time.begin()  # backend calls and the query embedding note their spans in it
        t_start = time.perf_counter()
        if req.session_id is None:
            history = prior[-2 * in_prompt :] if in_prompt else []
            async for ev in self._turn(req, history, user_text, None, timer, t_start, None):
                if isinstance(ev, Done):
                    observe_turn(ev.result)
                yield ev
            return
        # A question that cannot be a follow-up is its own retrieval query whatever the history holds
        # (app/rag/rewrite.py), so its one embedding starts now, beside the session load.
        early_embed: asyncio.Task[np.ndarray] | None = None
        if context.stands_alone(user_text):
            early_embed = asyncio.create_task(self._embed([user_text], timer))
        async with AsyncExitStack() as stack:
            # One turn at a time per session: it is held from load to save, so turns never interleave. The
            # prompt takes the last N answered turns; reading 2N leaves room for blocked ones.
            try:
                with timer.stage("load_session"):
                    session = await stack.enter_async_context(
                        self.state.store.open_turn(
                            req.session_id, last=2 * in_prompt, owner=req.owner, check_owner=req.check_owner
                        )
                    )
            except BaseException:
                _cancel(early_embed)
                raise
            history = history_messages(session.history, in_prompt)
            async for ev in self._turn(req, history, user_text, session, timer, t_start, early_embed):
                if isinstance(ev, Done):
                    observe_turn(ev.result)
                yield ev

    async def _turn(
        self,
        req: TurnRequest,
        history: list[dict[str, str]],
        user_text: str,
        session: OpenTurn | None,
        timer: Timer,
        t_start: float,
        early_embed: asyncio.Task[np.ndarray] | None,
    ) -> AsyncIterator[Delta | Done]:
        # The live rails are read once: a publish mid-turn does not affect this turn.
        turn = TurnScope(req, history, user_text, session, timer, t_start, self.state.rails.current)
        decision, sources, generation = await self._prepare(turn, early_embed)
        rail_results = list(decision.rails)
        if not decision.allowed:
            if generation is not None:
                await generation.cancel()
            answer = decision.refusal or turn.texts.refusal
            yield Delta(answer)
            turn.trace["blocked_by"] = decision.blocked_by
            yield await self._finish(turn, answer, rail_results, status="blocked")
            return
        if generation is None:  # nothing relevant retrieved: the configured "I don't know", never a guess
            turn.trace["answered_from"] = "no_sources"  # at once: no prompt for the LLM to read
            yield Delta(turn.texts.idk)
            yield await self._finish(turn, turn.texts.idk, rail_results)
            return
        streamed: StreamedAnswer | None = None
        # aclosing: a client gone mid-stream closes this generator at its yield; the stage must hear it now (it
        # stops generation and saves what was shown), not when the garbage collector finalises it.
        async with aclosing(self._stream(turn, generation, sources, rail_results)) as stream:
            async for event in stream:
                if isinstance(event, StreamedAnswer):
                    streamed = event
                else:
                    yield event
        assert streamed is not None
        async with aclosing(self._answer(turn, generation, sources, rail_results, streamed)) as outcome:
            async for out in outcome:
                yield out

    async def _prepare(
        self, turn: TurnScope, early_embed: asyncio.Task[np.ndarray] | None
    ) -> tuple[GuardDecision, list[Chunk], SpeculativeGeneration | None]:
        """Embeds, starts the input rails, retrieves and starts generating (speculatively: its tokens wait until the
        input rails pass); returns the input rails' decision, the sources and the generation (None: no prompt)."""
        st = self.state
        # A remote Llama Guard input check needs only the text: started now, it overlaps the embedding.
        prefetch = turn.guard.prefetch_input(turn.conversation)
        input_task: asyncio.Task[GuardDecision] | None = None
        generation: SpeculativeGeneration | None = None
        try:
            query, user_vec, query_vec = await self._queries(turn, early_embed)
            input_task = asyncio.create_task(self._input_rails(turn.guard, turn.conversation, user_vec, turn.timer))
            sources, turn.trace["retrieval"] = await context.retrieve(st, query, query_vec, turn.timer)
            context.prime_grounding(st, sources)
            sources, generation = self._start_generation(turn, sources)
            decision: GuardDecision = await input_task
        except BaseException:
            _cancel(early_embed)
            _cancel(input_task)
            if generation is not None:
                await generation.cancel()
            raise
        finally:
            _cancel(prefetch)  # not taken when a stage-1 example blocked first, or the turn failed
        return decision, sources, generation

    async def _queries(
        self, turn: TurnScope, early_embed: asyncio.Task[np.ndarray] | None
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """(retrieval query, the message's vector, the query's vector). The cheap join needs no model call, so the
        rewrite happens before embedding and both texts are embedded in ONE batched call shared by the classifier
        and the retriever."""
        rewrite = await context.rewrite(self.state, turn.user_text, turn.history, turn.timer)
        turn.trace["rewrite"] = rewrite
        query, user_text = rewrite["query"], turn.user_text
        if early_embed is not None:
            user_vec = (await early_embed)[0]
            query_vec = user_vec if query == user_text else (await self._embed([query], turn.timer))[0]
        else:
            vectors = await self._embed([user_text] if query == user_text else [user_text, query], turn.timer)
            user_vec, query_vec = vectors[0], vectors[-1]
        if query != user_text:  # a follow-up that named its own subject is searched alone
            query, query_vec = context.settle_query(self.state, user_text, rewrite, user_vec, query_vec)
        turn.about_history = context.is_about_conversation(user_text, turn.history, user_vec)
        return query, user_vec, query_vec

    def _start_generation(
        self, turn: TurnScope, sources: list[Chunk]
    ) -> tuple[list[Chunk], SpeculativeGeneration | None]:
        """Builds the prompt and starts generating at once (tokens wait in a queue until the input rails pass);
        None when there is no prompt (nothing relevant retrieved)."""
        st, req = self.state, turn.req
        settings = st.settings
        use_rag = settings.rag_enabled and st.retriever is not None
        with turn.timer.stage("prompt"):
            messages, sources = context.build_prompt(
                st, turn.user_text, turn.history, sources, turn.texts, use_rag, turn.about_history, turn.trace
            )
        if messages is None:
            return sources, None
        turn.trace["prompt_chars"] = sum(len(m["content"]) for m in messages)
        if sources:  # what the model read (an answer page holds more than retrieval returned): the eval's "sources"
            turn.trace["source_ids"] = [c.id for c in sources]
        if use_rag and not sources:
            turn.trace["answered_from"] = context.answered_from(turn.about_history)
        options = GenerationOptions(
            max_tokens=req.max_tokens or settings.llm_max_tokens,
            temperature=req.temperature if req.temperature is not None else settings.llm_temperature,
            top_p=req.top_p,
            stop=req.stop,
            adapter=req.adapter,
            request_id=req.request_id,
        )
        # A second look when it answers "I don't know" while a source covers the question (docs/rag.md).
        look = None
        if use_rag:
            look = second_look_plan(st, turn.user_text, turn.history, messages, sources, turn.texts.idk)
        llm = context.answering_llm(st, turn.user_text, turn.history, use_rag, turn.about_history)
        return sources, SpeculativeGeneration.start(llm, messages, options, look)

    async def _stream(
        self, turn: TurnScope, generation: SpeculativeGeneration, sources: list[Chunk], rail_results: list[RailResult]
    ) -> AsyncGenerator[Delta | StreamedAnswer, None]:
        """The answer through the output rails, window by window: each window that passes is a Delta; last comes
        what the rails decided (`StreamedAnswer`). A client gone mid-stream saves what it saw as interrupted."""
        guard, timer, req = turn.guard, turn.timer, turn.req
        context_texts = [c.content for c in sources]
        # A groundedness rail that only flags runs once on the whole answer (`_answer`); one that blocks must see
        # every window before it is shown, so the windows then carry the retrieved context.
        window_context = context_texts if guard.grounding_blocks else None

        async def check(window: str) -> GuardDecision:
            return await guard.check_output(turn.conversation, window, window_context)

        streamed = StreamedAnswer()

        def start_grounding(full_text: str) -> None:
            # A flagging groundedness rail reads the whole answer; it starts as soon as generation ends, so its
            # MiniLM pass overlaps the last window's safety check instead of following it.
            if context_texts and not guard.grounding_blocks:
                streamed.grounding = asyncio.create_task(
                    guard.check_groundedness(turn.conversation, full_text, context_texts)
                )

        first_token_at: float | None = None
        gen_start = time.perf_counter()
        # Nobody reads a non-streamed answer before it is whole: larger windows, fewer guard calls (a long
        # answer is still cut off early if it turns unsafe).
        tail_chars = guard.output_chunk_chars * TAIL_CHUNKS  # also what the embedded judge reads whole
        window_chars = guard.output_chunk_chars if req.stream else tail_chars
        try:
            async for event in hold_back(
                generation.deltas(),
                check,
                chunk_chars=window_chars,
                context_chars=guard.output_context_chars,
                first_chunk_chars=self.state.settings.output_rails_first_chunk_chars if req.stream else window_chars,
                on_generated=start_grounding,
                ended=lambda: generation.ended,
                tail_chars=tail_chars,
            ):
                if isinstance(event, Released):
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    streamed.released.append(event.text)
                    yield Delta(event.text)
                elif isinstance(event, Finished):
                    streamed.final = event
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away mid-stream: stop generating, keep what was shown, mark it interrupted.
            _cancel(streamed.grounding)
            await generation.cancel()
            partial = "".join(streamed.released)
            result = self._result(turn, partial, rail_results, status="interrupted", finish_reason="interrupted")
            await asyncio.shield(self._save(turn.session, turn.user_text, result, timer))
            raise
        except BaseException:
            _cancel(streamed.grounding)
            await generation.cancel()
            raise
        timer.timings["generate"] = (time.perf_counter() - gen_start) * 1000
        generation.note_trace(turn.trace)
        if first_token_at is not None:
            timer.timings["first_token"] = (first_token_at - turn.t_start) * 1000
        yield streamed

    async def _answer(
        self,
        turn: TurnScope,
        generation: SpeculativeGeneration,
        sources: list[Chunk],
        rail_results: list[RailResult],
        streamed: StreamedAnswer,
    ) -> AsyncGenerator[Delta | Done, None]:
        """After the last window: the block (refusal) or the answer with its citations, saved."""
        final, grounding = streamed.final, streamed.grounding
        assert final is not None
        rail_results = rail_results + final.decision.rails
        blocking: GuardDecision | None = None if final.decision.allowed else final.decision
        shown = final.released_text
        if blocking is not None:
            _cancel(grounding)
            await generation.cancel()  # nothing more can be shown: the backend must stop generating now
        elif grounding is not None:
            with turn.timer.stage("groundedness"):  # only what is left of it after the last window's check
                grounded = await grounding
            rail_results = [r for r in rail_results if r.name != "groundedness"] + grounded.rails
            if not grounded.allowed:  # a flagging rail never blocks: only a guard error (fail closed) gets here
                blocking, shown = grounded, final.full_text
        if blocking is not None:
            refusal = blocking.refusal or turn.texts.refusal
            gap = "\n\n" if streamed.released else ""
            # What the user already saw passed the rails; the refusal ends the stream.
            yield Delta(gap + refusal)
            # A groundedness block replaces the answer (rails/config.yml: facts: block): the saved turn, the
            # non-streamed reply and the web chat's final render hold the "I don't know" alone, not the first
            # window ("An") a streaming client already got. A safety block keeps what was shown: it passed.
            answer = refusal if blocking.blocked_by == "groundedness" else shown + gap + refusal
            turn.trace["blocked_by"] = blocking.blocked_by
            yield await self._finish(turn, answer, rail_results, status="blocked", generation=generation)
            return
        answer = final.full_text
        citations = self._citations(answer, sources) if sources else []
        if sources and not citations:
            suffix = context.attributed_citations(answer, sources, turn.texts.idk)
            if suffix:  # markers only: text the rails already passed stays as it was
                yield Delta(suffix)
                answer += suffix
                citations = self._citations(answer, sources)
                turn.trace["citations"] = "attributed by wording"
        yield await self._finish(turn, answer, rail_results, citations=citations, generation=generation,
                                 finish_reason=generation.finish_reason or "stop")

    # --- stages -------------------------------------------------------------------------------

    @classmethod
    async def _input_rails(
        cls, guard: Any, conversation: list[dict[str, str]], user_vec: np.ndarray, timer: Timer
    ) -> GuardDecision:
        # Yield first. When retrieval does not wait on anything, this task first runs at `await input_task`, just
        # after the speculative generation was started; yielding lets that LLM request go out before the rails'
        # CPU work (~1 ms) delays it. aiohttp needs two loop iterations to put a request on a pooled connection
        # (the request, then its body-writer task): tests/pipeline/test_turn.py checks that it went out.
        for _ in range(2):
            await asyncio.sleep(0)
        decision: GuardDecision = await cls._timed(guard.check_input(conversation, user_vec), timer, "input_rails")
        return decision

    @staticmethod
    async def _timed(coro: Any, timer: Timer, name: str) -> Any:
        start = time.perf_counter()
        try:
            return await coro
        finally:
            timer.timings[name] = (time.perf_counter() - start) * 1000

    async def _embed(self, texts: list[str], timer: Timer) -> np.ndarray:
        with timer.stage("embed"), model_time.span():
            return await asyncio.to_thread((self.state.query_embedder or self.state.embedder).embed, texts)

    @staticmethod
    def _citations(answer: str, sources: list[Chunk]) -> list[dict[str, Any]]:
        from app.rag.chain import extract_citations

        return extract_citations(answer, sources)

    async def _finish(
        self,
        turn: TurnScope,
        answer: str,
        rails: list[RailResult],
        *,
        status: str = "ok",
        citations: list[dict[str, Any]] | None = None,
        generation: SpeculativeGeneration | None = None,
        finish_reason: str = "stop",
    ) -> Done:
        """The turn's one result, saved with the session (which lets go of it)."""
        result = self._result(turn, answer, rails, status=status, citations=citations, finish_reason=finish_reason)
        if generation is not None:
            result.prompt_tokens = turn.trace["prompt_tokens"] = generation.prompt_tokens
            result.completion_tokens = turn.trace["completion_tokens"] = generation.completion_tokens
        await self._save(turn.session, turn.user_text, result, turn.timer)
        return Done(result)

    @staticmethod
    def _result(
        turn: TurnScope,
        answer: str,
        rails: list[RailResult],
        *,
        status: str = "ok",
        citations: list[dict[str, Any]] | None = None,
        finish_reason: str = "stop",
    ) -> TurnResult:
        now = time.perf_counter()
        timings = turn.timer.timings
        timings["total"] = (now - turn.t_start) * 1000
        # The part of the turn spent waiting on models (LLM, Llama Guard, the query embedding), overlaps once.
        timings["model"] = model_time.covered_ms(turn.timer.model_spans, turn.t_start, now)
        return TurnResult(
            answer=answer,
            blocked=status == "blocked",
            session_id=turn.req.session_id,  # None exactly when `turn.session` is
            turn_id=turn.turn_id,
            rails=rails,
            citations=citations or [],
            timings_ms=timings,
            trace=turn.trace,
            status=status,
            finish_reason=finish_reason,
        )

    @staticmethod
    async def _save(session: OpenTurn | None, user_text: str, result: TurnResult, timer: Timer) -> None:
        if session is None:
            return
        turn = Turn(
            id=result.turn_id,
            user=user_text,
            answer=result.answer,
            status=result.status,  # type: ignore[arg-type]
            blocked=result.blocked,
            metadata={**result.guardchat(), "trace": result.trace},
        )
        with timer.stage("save"):
            await session.commit(turn)  # also lets go of the session
