"""The retrieval boundary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from app.rag.index import IndexSnapshot


@dataclass
class Chunk:
    id: str
    document_id: str
    source: str
    title: str
    content: str
    section: str = ""
    page: int | None = None
    score: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 array of shape (len(texts), dim)."""
        ...


@dataclass
class RetrievalResult:
    chunks: list[Chunk]
    dropped: list[tuple[Chunk, str, float]] = field(default_factory=list)  # (chunk, reason, rail score)
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds


class Retriever(Protocol):
    """What the turn, the search API, the knowledge console and the eval read of the live index
    (app/rag/retrieve.py HybridRetriever)."""

    @property
    def snapshot(self) -> IndexSnapshot:
        """The index version searches run on now (chunks, embeddings, BM25, the document manifest)."""
        ...

    def reload(self) -> bool:
        """Loads the live index version if it changed; True when swapped."""
        ...

    def documents(self) -> list[dict[str, Any]]:
        """The manifest's entries (without server paths), each with its `document_id`."""
        ...

    def embeddings_for(self, chunks: list[Chunk]) -> np.ndarray | None:
        """The stored embeddings of `chunks`, or None if one is not in the live index."""
        ...

    def dense_search(self, embedding: np.ndarray, k: int) -> list[Chunk]:
        """Plain dense top-k, no threshold."""
        ...

    async def retrieve_detailed(
        self, query: str, embedding: np.ndarray, k: int | None = None, *, threshold: float | None = None
    ) -> RetrievalResult:
        """Hybrid search, then the retrieval rail; what it dropped and the stage timings."""
        ...

    async def retrieve(self, query: str, embedding: np.ndarray, k: int) -> list[Chunk]:
        """Hybrid retrieval for a standalone query whose embedding the caller computed once."""
        ...
