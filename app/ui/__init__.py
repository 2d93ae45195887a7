"""The web UI: the customer chat at `/` and the admin console at `/admin`, mounted into the API's
FastAPI app (one process, one port).

Call `mount_ui(app, settings)` AFTER every API route has been added (app/main.py does, last): Starlette matches
routes in order, and a mount at `/` matches every path. The admin console and its `/admin` redirect go in before
the chat's catch-all `/`; tests/ui/test_mount.py checks that every API route still wins.
"""

from __future__ import annotations

import secrets
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from app.settings import Settings
from app.state import AppState
from app.ui.style import CSS

CHAT_PATH = "/"
ADMIN_PATH = "/admin"

__all__ = ["mount_ui", "CHAT_PATH", "ADMIN_PATH"]


def mount_ui(app: FastAPI, settings: Settings) -> None:
    """Mounts the chat at `/` and the admin console at `/admin` on `app`."""
    from app.ui.admin import build_admin
    from app.ui.chat import build_chat

    def get_state() -> AppState:
        # Read at request time: the lifespan builds the state after the app (and this UI) exist.
        state: AppState = app.state.guardchat
        return state

    # localStorage is encrypted with this secret; set GUARDCHAT_UI_SECRET so a chat survives a restart.
    secret = settings.ui_secret.get_secret_value() if settings.ui_secret else ""
    browser_secret = secret or secrets.token_urlsafe(24)

    common: dict[str, Any] = {"footer_links": [], "ssr_mode": False, "css": CSS, "show_error": False, "pwa": False}
    admin = build_admin(get_state, settings)
    gr.mount_gradio_app(app, admin, path=ADMIN_PATH, **common)

    async def admin_without_slash() -> RedirectResponse:
        # Otherwise the mount at "/" would answer `/admin` (no slash) with the chat app's 404.
        return RedirectResponse(ADMIN_PATH + "/", status_code=307)

    app.add_api_route(ADMIN_PATH, admin_without_slash, methods=["GET"], include_in_schema=False)
    chat = build_chat(get_state, browser_secret=browser_secret)
    gr.mount_gradio_app(app, chat, path=CHAT_PATH, **common)  # the catch-all, last
