"""Annotated dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.state import AppState

# Dependencies are `async def` even with nothing to await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop on every request (measurable at c=1, and pool contention under load).


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.guardchat
    return state


StateDep = Annotated[AppState, Depends(get_state)]
