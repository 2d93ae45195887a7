"""Session management: create, read (history with per-turn metadata), delete, feedback.

A session belongs to the API key that created it (`SessionInfo.owner` holds a hash of the key, see
app/api/security.py); any other key gets 404 for it, exactly as for a session that does not exist.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from app.api.deps import StateDep
from app.api.errors import APIError
from app.api.security import request_owner, require_session_owner
from app.sessions.base import SessionNotFound

router = APIRouter(prefix="/api/sessions", tags=["sessions"])


class FeedbackRequest(BaseModel):
    value: int = Field(ge=-1, le=1, description="+1 thumbs up, -1 thumbs down, 0 clears")


@router.post("", status_code=201)
async def create_session(request: Request, state: StateDep) -> dict[str, Any]:
    info = await state.store.create(owner=request_owner(request))
    return {"id": info.id, "created_at": info.created_at}


@router.get("/{session_id}")
async def get_session(session_id: str, request: Request, state: StateDep) -> dict[str, Any]:
    info = await require_session_owner(state.store, session_id, request_owner(request))
    turns = await state.store.history(session_id)
    return {
        "id": info.id,
        "created_at": info.created_at,
        "turn_count": info.turn_count,
        "turns": [t.model_dump() for t in turns],
    }


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: str, request: Request, state: StateDep) -> Response:
    await require_session_owner(state.store, session_id, request_owner(request))
    if not await state.store.delete(session_id):
        raise SessionNotFound(session_id)
    return Response(status_code=204)


@router.post("/{session_id}/turns/{turn_id}/feedback")
async def turn_feedback(
    session_id: str, turn_id: str, body: FeedbackRequest, request: Request, state: StateDep
) -> dict[str, Any]:
    try:
        await require_session_owner(state.store, session_id, request_owner(request))
        await state.store.set_feedback(session_id, turn_id, body.value)
    except SessionNotFound as exc:
        raise APIError(404, f"Unknown session or turn: {exc}", "not_found") from exc
    return {"session_id": session_id, "turn_id": turn_id, "feedback": body.value}
