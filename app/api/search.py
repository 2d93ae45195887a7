"""POST /v1/search: hybrid retrieval over the knowledge base (the same retriever and rail as chat).

The chat's gate (`rag_score_threshold`: nothing is retrieved when the best chunk's cosine is under it, and the turn
says "I don't know" at once) is the answer path's decision. A search caller gets the k best chunks with their scores
for any query (`rag_search_threshold`, 0 by default) and may ask for a gate with `threshold`.
"""

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
    # Return nothing unless the best chunk's cosine reaches it (then chunks need only min(threshold, chunk floor)).
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


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
    threshold = state.settings.rag_search_threshold if body.threshold is None else body.threshold
    result = await retriever.retrieve_detailed(query, embedding, k, threshold=threshold)
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
