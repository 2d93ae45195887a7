"""The retrieval boundary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np


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


class Retriever(Protocol):
    async def retrieve(self, query: str, embedding: np.ndarray, k: int) -> list[Chunk]:
        """Hybrid retrieval for a standalone query whose embedding the caller computed once."""
        ...
