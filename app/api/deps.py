"""Annotated dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.settings import Settings
from app.state import AppState

# Dependencies are `async def` even with nothing to await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop on every request (measurable at c=1, and pool contention under load).


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.guardchat
    return state


async def get_app_settings(request: Request) -> Settings:
    return (await get_state(request)).settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
