"""POST /v1/checks: the input rails only, no generation — our guard as a service."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter

from app.api.deps import StateDep
from app.api.errors import APIError
from app.api.schemas import CheckRequest
from app.api.security import check_characters, check_message_limits, check_text_limit  # hardening (issue 6)

router = APIRouter(tags=["checks"])


@router.post("/v1/checks")
async def checks(body: CheckRequest, state: StateDep) -> dict[str, Any]:
    # Hardening (issue 6): the same size limits as a chat turn (413 naming the limit).
    check_message_limits(body.messages or [], state.settings)
    check_text_limit(len(body.input or ""), state.settings, "input")
    check_characters(body.input or "", "input")
    if body.messages:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages if m.role in ("user", "assistant")]
        except ValueError as exc:
            raise APIError(400, str(exc), "unsupported_content") from exc
    elif body.input is not None:
        messages = [{"role": "user", "content": body.input}]
    else:
        raise APIError(400, "Give `input` (a string) or `messages`.", "missing_input")
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise APIError(400, "The last message must be a non-empty user message.", "invalid_messages")
    guard = state.rails.current.guard
    start = time.perf_counter()
    vec = (await asyncio.to_thread(state.embedder.embed, [messages[-1]["content"]]))[0]
    decision = await guard.check_input(messages, vec)
    return {
        "allowed": decision.allowed,
        "blocked_by": decision.blocked_by,
        "refusal": decision.refusal if not decision.allowed else None,
        "rails": [
            {
                "name": r.name,
                "verdict": r.verdict,
                "categories": r.categories,
                "score": r.score,
                "latency_ms": round(r.latency_ms, 3),
                "detail": r.detail,
            }
            for r in decision.rails
        ],
        "latency_ms": round((time.perf_counter() - start) * 1000, 3),
    }
