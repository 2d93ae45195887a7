"""POST /v1/search: hybrid retrieval over the knowledge base (the same retriever and rail as chat)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import StateDep
from app.api.errors import APIError
from app.api.security import check_characters

router = APIRouter(tags=["knowledge"])


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int | None = Field(default=None, ge=1, le=50)


class SearchResult(BaseModel):
    document_id: str
    source: str
    title: str
    section: str = ""
    page: int | None = None
    content: str
    score: float


class SearchResponse(BaseModel):
    results: list[SearchResult]
    dropped: int = 0  # chunks removed by the retrieval rail
    timings_ms: dict[str, float] = Field(default_factory=dict)


@router.post("/v1/search", response_model=SearchResponse)
async def search(body: SearchRequest, state: StateDep) -> SearchResponse:
    retriever = state.retriever
    if retriever is None or not state.settings.rag_enabled:
        raise APIError(503, "Retrieval is disabled on this server.", "retrieval_disabled")
    query = body.query.strip()
    check_characters(query, "query")  # lone surrogates / NUL would crash the tokenizer (500)
    if not query:
        raise APIError(400, "The query is empty.", "invalid_request")
    k = body.k or state.settings.rag_top_k
    embedding = (await asyncio.to_thread(state.embedder.embed, [query]))[0]
    result = await retriever.retrieve_detailed(query, embedding, k)
    chunks, dropped, timings = result.chunks, len(result.dropped), result.timings
    results = [
        SearchResult(
            document_id=c.document_id,
            source=c.source,
            title=c.title,
            section=c.section,
            page=c.page,
            content=c.content,
            score=round(float(c.score), 4),
        )
        for c in chunks
    ]
    return SearchResponse(results=results, dropped=dropped, timings_ms={k_: round(v, 3) for k_, v in timings.items()})
