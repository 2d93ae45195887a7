"""Annotated dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.settings import Settings
from app.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.guardchat
    return state


def get_app_settings(request: Request) -> Settings:
    return get_state(request).settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
