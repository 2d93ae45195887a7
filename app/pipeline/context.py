"""The RAG stages of a turn, between the input and the model: the standalone query (rewrite), retrieval
with its trace, and the prompt with the sources it holds. Each is timed into the turn's Timer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from app.guard.base import AssistantTexts
from app.llm.base import ChatBackend
from app.pipeline.conversation import (
    NameCheckedLLM,
    about_conversation,
    asks_name,
    conversation_messages,
    is_small_talk,
    small_talk_messages,
)
from app.pipeline.conversation_intent import shipped_intent
from app.pipeline.turn_types import Timer
from app.rag.base import Chunk
from app.rag.grounding import supporting_sources
from app.rag.rewrite import looks_like_follow_up, rewrite_query
from app.state import AppState


def stands_alone(question: str) -> bool:
    """True when `question` cannot be a follow-up, so it is its own retrieval query whatever the history."""
    return not looks_like_follow_up(question)


def attributed_citations(answer: str, sources: list[Chunk], idk_text: str) -> str:
    """For an answer that cites nothing: the markers of the sources that support it by wording (" [1][3]"), or
    "" (small models often drop the [n] the prompt asks for; RAG answers mostly restate their sources)."""
    numbers = supporting_sources(answer, sources, idk_text)
    return " " + "".join(f"[{n}]" for n in numbers) if numbers else ""


async def rewrite(state: AppState, question: str, history: list[dict[str, str]], timer: Timer) -> dict[str, Any]:
    with timer.stage("rewrite"):
        pairs = [(history[i]["content"], history[i + 1]["content"]) for i in range(0, len(history) - 1, 2)]
        mode = state.settings.query_rewrite
        rw = await rewrite_query(question, pairs, mode=mode, llm=state.llm if mode == "llm" else None)
        out: dict[str, Any] = {"query": rw.query, "mode": rw.mode, "latency_ms": round(rw.latency_ms, 3)}
        if rw.implicit:
            out["implicit"] = True
        return out


def settle_query(
    state: AppState, question: str, rewrite: dict[str, Any], question_vec: np.ndarray, query_vec: np.ndarray
) -> tuple[str, np.ndarray]:
    """The query (and its vector) to search: an implicit follow-up is searched alone when it named its own subject
    (app/rag/rewrite.py `settle`: two dense top-1 lookups, no embedding). Notes the choice in the rewrite trace."""
    query = str(rewrite["query"])
    retriever = state.retriever
    if not rewrite.get("implicit") or retriever is None:
        return query, query_vec
    from app.rag.rewrite import Rewrite, settle

    def nearest(vec: np.ndarray) -> np.ndarray | None:
        found = retriever.dense_search(vec, 1)
        stored = retriever.embeddings_for(found) if found else None
        return None if stored is None else np.asarray(stored[0])

    rw = Rewrite(query, "join", implicit=True)
    chosen, gap = settle(question, rw, question_vec, query_vec, nearest)
    if gap is not None:
        rewrite["subject_gap"] = round(gap, 3)
    if chosen == question:
        rewrite["searched"] = "question alone (it names its own subject)"
        return question, question_vec
    return query, query_vec


async def retrieve(state: AppState, query: str, vec: np.ndarray, timer: Timer) -> tuple[list[Chunk], dict[str, Any]]:
    if not state.settings.rag_enabled or state.retriever is None:
        return [], {"enabled": False}
    with timer.stage("retrieve"):
        res = await state.retriever.retrieve_detailed(query, vec, state.settings.rag_top_k)
        chunks = list(res.chunks)
        dropped = [
            {"id": c.id, "document_id": c.document_id, "reason": reason, "score": round(float(score), 4)}
            for c, reason, score in res.dropped
        ]
    return chunks, {
        "chunks": [{"id": c.id, "document_id": c.document_id, "score": round(c.score, 4)} for c in chunks],
        "dropped": dropped,
    }


def prime_grounding(state: AppState, sources: list[Chunk]) -> None:
    """Hands the groundedness rail the vectors the index already holds for these chunks."""
    if sources and state.grounding is not None and state.retriever is not None:
        state.grounding.prime([c.content for c in sources], state.retriever.embeddings_for(sources))


def is_about_conversation(question: str, history: list[dict[str, str]], vector: np.ndarray | None) -> bool:
    """A question the history answers, not the knowledge base ("what was my name?", "bullet it out"): there is
    history, and the phrases (conversation.py) or the nearest examples (conversation_intent.py, on the message's
    vector) say so."""
    if not history:
        return False
    if about_conversation(question):
        return True
    if vector is None:
        return False
    intent = shipped_intent(len(vector))
    return intent is not None and intent.is_about_conversation(vector)


def answered_from(about_history: bool) -> str:
    """What a RAG turn without sources is answered from (the trace's `answered_from`): see `build_prompt`."""
    return "conversation" if about_history else "small_talk"


def answering_llm(
    state: AppState, question: str, history: list[dict[str, str]], use_rag: bool, about_history: bool
) -> ChatBackend:
    """The backend that answers the turn: the state's, or for a question about the customer's name that the history
    answers (`build_prompt`), one that checks the name it states against the customer's messages."""
    if use_rag and about_history and asks_name(question):
        return NameCheckedLLM(state.llm, history)
    return state.llm


def bm25_idf(state: AppState) -> Callable[[str], float] | None:
    """The live index's BM25 term weights, which passage selection scores the question's words with."""
    return None if state.retriever is None else state.retriever.snapshot.bm25.idf


def build_prompt(
    state: AppState,
    question: str,
    history: list[dict[str, str]],
    sources: list[Chunk],
    texts: AssistantTexts,
    use_rag: bool,
    about_history: bool = False,
    trace: dict[str, Any] | None = None,
) -> tuple[list[dict[str, str]] | None, list[Chunk]]:
    """The generation prompt and the sources it actually holds (numbered, cut to the token budget).
    None when RAG is on and nothing relevant was retrieved: the turn then answers the "I don't know" text at once,
    without asking the LLM. A question about the conversation itself, when there is one, is answered from the
    history alone (`about_history`: `is_about_conversation`), and a greeting or thanks that retrieval finds
    nothing for gets a reply of its own (app/pipeline/conversation.py): neither is a knowledge-base question."""
    if not use_rag:
        system = {"role": "system", "content": texts.system_prompt}
        return [system, *history, {"role": "user", "content": question}], []
    if about_history:  # "what was my name?": the history answers, not the KB
        return conversation_messages(texts.system_prompt, history, question), []
    if not sources and is_small_talk(question):  # "hi!", "thanks, bye": nothing to look up, nothing to not know
        return small_talk_messages(texts.system_prompt, history, question), []
    from app.rag.chain import build_messages

    if state.settings.rag_context_mode == "pages":
        from app.pipeline.answer_pages import page_prompt

        paged = page_prompt(state, question, history, sources, texts)
        if trace is not None and sources:  # "why?": whether the answer page was read from the LLM's cache
            trace["context"] = paged.variables["context"] if paged is not None else "passages (page not cached yet)"
        if paged is not None:
            return list(paged.messages), list(paged.sources)
    prepared = build_messages(
        question,
        history,
        sources,
        system_prompt=texts.system_prompt,
        context_tokens=state.settings.rag_context_tokens,
        idk_text=texts.idk,
        fit="chunks" if state.settings.rag_context_mode == "chunks" else "passages",
        min_context_tokens=state.settings.rag_context_min_tokens,
        idf=bm25_idf(state),
    )
    if prepared.no_context:
        return None, []
    return list(prepared.messages), list(prepared.sources)
