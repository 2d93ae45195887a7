"""A Guard that allows everything. Only for explicit configuration and for unit tests of other layers."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from app.guard.base import AssistantTexts, GuardDecision, RailResult


class PassThroughGuard:
    def __init__(
        self, texts: AssistantTexts | None = None, *, output_chunk_chars: int = 200, output_context_chars: int = 400
    ) -> None:
        self.texts = texts or AssistantTexts()
        self.output_chunk_chars = output_chunk_chars
        self.output_context_chars = output_context_chars
        self.grounding_blocks = False

    def prefetch_input(self, messages: list[dict[str, str]]) -> asyncio.Future[Any] | None:
        return None

    async def check_input(self, messages: list[dict[str, str]], embedding: np.ndarray | None = None) -> GuardDecision:
        return GuardDecision(
            allowed=True, rails=[RailResult("passthrough", "skip", detail="no input rails configured")]
        )

    async def check_output(
        self, messages: list[dict[str, str]], answer: str, context: list[str] | None = None
    ) -> GuardDecision:
        return GuardDecision(
            allowed=True, rails=[RailResult("passthrough", "skip", detail="no output rails configured")]
        )

    async def check_groundedness(
        self, messages: list[dict[str, str]], answer: str, context: list[str]
    ) -> GuardDecision:
        return GuardDecision(allowed=True, rails=[])

    async def aclose(self) -> None:
        return None
