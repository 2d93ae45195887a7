"""Mounting the UI into the API app: one app, one port, and every API route still wins over the mounts."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Match, Mount

from app.main import create_app
from app.settings import Settings
from app.ui import mount_ui


def _first_match(app: FastAPI, path: str, method: str = "GET") -> object:
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route
    raise AssertionError(f"nothing matches {path}")


def test_api_routes_win_over_the_ui_mounts_in_the_real_app() -> None:
    app = create_app(Settings(ui_enabled=True))
    for path, method in [
        ("/healthz", "GET"),
        ("/v1/chat/completions", "POST"),
        ("/api/sessions", "POST"),
        ("/admin/api/rails", "GET"),
        ("/docs", "GET"),
        ("/openapi.json", "GET"),
    ]:
        assert not isinstance(_first_match(app, path, method), Mount), path
    ui = [r for r in app.router.routes if isinstance(r, Mount)]
    assert [r.path for r in ui[-2:]] == ["/admin", ""]  # /admin before the catch-all "/"


def test_pages_and_api_answer_on_one_app() -> None:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    mount_ui(app, Settings())

    client = TestClient(app)
    assert client.get("/healthz").json() == {"status": "ok"}
    chat = client.get("/")
    assert chat.status_code == 200 and "text/html" in chat.headers["content-type"]
    admin = client.get("/admin/")
    assert admin.status_code == 200 and "text/html" in admin.headers["content-type"]
    redirect = client.get("/admin", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/admin/"
