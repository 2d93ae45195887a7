"""The RAG stages of a turn, between the input and the model: the standalone query (rewrite), retrieval
with its trace, and the prompt with the sources it holds. Each is timed into the turn's Timer."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.guard.base import AssistantTexts
from app.pipeline.conversation import about_conversation, conversation_messages
from app.pipeline.turn_types import Timer
from app.rag.base import Chunk
from app.state import AppState


def stands_alone(question: str) -> bool:
    """True when `question` cannot be a follow-up, so it is its own retrieval query whatever the history."""
    try:
        from app.rag.rewrite import looks_like_follow_up
    except ImportError:  # RAG package not installed in this build: no rewrite either
        return True
    return not looks_like_follow_up(question)


def attributed_citations(answer: str, sources: list[Chunk], idk_text: str) -> str:
    """For an answer that cites nothing: the markers of the sources that support it by wording (" [1][3]"), or
    "" (small models often drop the [n] the prompt asks for; RAG answers mostly restate their sources)."""
    try:
        from app.rag.grounding import supporting_sources
    except ImportError:  # RAG package not installed in this build
        return ""
    numbers = supporting_sources(answer, sources, idk_text)
    return " " + "".join(f"[{n}]" for n in numbers) if numbers else ""


async def rewrite(state: AppState, question: str, history: list[dict[str, str]], timer: Timer) -> dict[str, Any]:
    with timer.stage("rewrite"):
        try:
            from app.rag.rewrite import rewrite_query
        except ImportError:  # RAG package not installed in this build
            return {"query": question, "mode": "none"}
        pairs = [(history[i]["content"], history[i + 1]["content"]) for i in range(0, len(history) - 1, 2)]
        mode = state.settings.query_rewrite
        rw = await rewrite_query(question, pairs, mode=mode, llm=state.llm if mode == "llm" else None)
        return {"query": rw.query, "mode": rw.mode, "latency_ms": round(rw.latency_ms, 3)}


async def retrieve(state: AppState, query: str, vec: np.ndarray, timer: Timer) -> tuple[list[Chunk], dict[str, Any]]:
    if not state.settings.rag_enabled or state.retriever is None:
        return [], {"enabled": False}
    with timer.stage("retrieve"):
        detailed = getattr(state.retriever, "retrieve_detailed", None)
        if detailed is not None:
            res = await detailed(query, vec, state.settings.rag_top_k)
            chunks = list(res.chunks)
            dropped = [
                {"id": c.id, "document_id": c.document_id, "reason": reason, "score": round(float(score), 4)}
                for c, reason, score in res.dropped
            ]
        else:
            chunks = await state.retriever.retrieve(query, vec, state.settings.rag_top_k)
            dropped = []
    return chunks, {
        "chunks": [{"id": c.id, "document_id": c.document_id, "score": round(c.score, 4)} for c in chunks],
        "dropped": dropped,
    }


def prime_grounding(state: AppState, sources: list[Chunk]) -> None:
    """Hands the groundedness rail the vectors the index already holds for these chunks."""
    grounding = state.extras.get("grounding")
    embeddings_for = getattr(state.retriever, "embeddings_for", None)
    if sources and grounding is not None and hasattr(grounding, "prime") and embeddings_for is not None:
        grounding.prime([c.content for c in sources], embeddings_for(sources))


def build_prompt(
    state: AppState,
    question: str,
    history: list[dict[str, str]],
    sources: list[Chunk],
    texts: AssistantTexts,
    use_rag: bool,
) -> tuple[list[dict[str, str]] | None, list[Chunk]]:
    """The generation prompt and the sources it actually holds (numbered, cut to the token budget).
    None when RAG is on and nothing relevant was retrieved: the answer is then "I don't know". A question about the
    conversation itself, when there is one, is answered from the history alone (app/pipeline/conversation.py)."""
    if not use_rag:
        system = {"role": "system", "content": texts.system_prompt}
        return [system, *history, {"role": "user", "content": question}], []
    if history and about_conversation(question):  # "what was my name?": the history answers, not the KB
        return conversation_messages(texts.system_prompt, history, question), []
    from app.rag.chain import build_messages

    prepared = build_messages(
        question,
        history,
        sources,
        system_prompt=texts.system_prompt,
        context_tokens=state.settings.rag_context_tokens,
        idk_text=texts.idk,
    )
    if prepared.no_context:
        return None, []
    return list(prepared.messages), list(prepared.sources)
