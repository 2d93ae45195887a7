"""The admin REST API on a small FastAPI app: our router + the project's error handlers, a real file
version store, and the publisher with the admin tests' injected validator/guard (tests/admin/helpers.py)."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from app.admin.versions import FileRailsVersionStore
from app.api.admin import router
from app.api.errors import install_error_handlers
from app.settings import Settings
from app.state import AppState
from tests.admin.helpers import BASE_FILES, initial_live, make_publisher, with_blocked

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class AdminSettings(Settings):
    admin_token: SecretStr | None = None  # GUARDCHAT_ADMIN_TOKEN, added to Settings by the lead


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    store = FileRailsVersionStore(tmp_path / "rails_versions")
    await store.ensure_seeded(BASE_FILES)
    live = initial_live()
    publisher = make_publisher(store, live)
    await publisher.start()
    state = AppState(
        settings=AdminSettings(admin_token=SecretStr(TOKEN), data_dir=tmp_path),
        llm=None,  # type: ignore[arg-type]  # the admin routes never reach these
        store=None,  # type: ignore[arg-type]
        embedder=None,  # type: ignore[arg-type]
        retriever=None,
        rails=live,
        rails_publisher=publisher,
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.guardchat = state
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, state
    await publisher.stop()


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/api/rails"),
        ("PUT", "/admin/api/rails"),
        ("POST", "/admin/api/rails/rollback"),
        ("GET", "/admin/api/rails/versions"),
        ("GET", "/admin/api/rails/diff"),
    ],
)
async def test_every_route_needs_the_admin_token(
    admin: tuple[httpx.AsyncClient, AppState], method: str, path: str
) -> None:
    client, state = admin
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"X-Admin-Token": TOKEN}):
        response = await client.request(method, path, headers=headers, json={})
        assert response.status_code == 401, headers
        assert error_of(response)["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert state.rails.current.version == "1"


async def test_no_configured_token_disables_the_api(admin: tuple[httpx.AsyncClient, AppState]) -> None:
    client, state = admin
    state.settings = AdminSettings(admin_token=None)
    response = await client.get("/admin/api/rails", headers=AUTH)
    assert response.status_code == 401 and error_of(response)["code"] == "admin_disabled"


async def test_publish_makes_the_new_version_live(admin: tuple[httpx.AsyncClient, AppState]) -> None:
    client, state = admin
    current = (await client.get("/admin/api/rails", headers=AUTH)).json()
    assert current["version"] == 1 and current["files"] == BASE_FILES
    body = {"base_version": 1, "files": with_blocked(["bomb", "gun"]), "message": "block guns"}
    response = await client.put("/admin/api/rails", headers={**AUTH, "X-Admin-User": "alice"}, json=body)
    assert response.status_code == 200, response.text
    published = response.json()
    assert (published["version"], published["author"], published["message"]) == (2, "alice", "block guns")
    assert state.rails.current.version == "2"
    assert not (await state.rails.current.guard.check_input([{"role": "user", "content": "a gun"}])).allowed
    assert (await client.get("/admin/api/rails", headers=AUTH)).json()["files"] == with_blocked(["bomb", "gun"])
    status = (await client.get("/admin/api/rails/status", headers=AUTH)).json()
    assert status == {
        "live_version": 2, "serving_version": "2", "last_sync_error": None, "engine": None, "engine_reason": None
    }  # the test guard is not a NeMo config: no engine


async def test_conflict_and_invalid_leave_live_untouched(admin: tuple[httpx.AsyncClient, AppState]) -> None:
    client, state = admin
    await client.put("/admin/api/rails", headers=AUTH, json={"base_version": 1, "files": with_blocked(["bomb", "x"])})
    serving = state.rails.current

    stale = await client.put("/admin/api/rails", headers=AUTH, json={"base_version": 1, "files": BASE_FILES})
    assert stale.status_code == 409 and error_of(stale)["code"] == "rails_version_conflict"

    broken = {**BASE_FILES, "config.yml": "models: []\nrails: {input: [\n"}
    invalid = await client.put("/admin/api/rails", headers=AUTH, json={"base_version": 2, "files": broken})
    assert invalid.status_code == 422 and error_of(invalid)["code"] == "invalid_rails"
    assert invalid.json()["errors"][0]["file"] == "config.yml" and invalid.json()["errors"][0]["line"] == 3
    assert "config.yml:3" in error_of(invalid)["message"]

    failing = await client.put("/admin/api/rails", headers=AUTH, json={"base_version": 2, "files": with_blocked([])})
    assert failing.status_code == 422 and failing.json()["tests"] == [{"name": "blocks bomb", "passed": False}]

    escape = await client.put(
        "/admin/api/rails", headers=AUTH, json={"base_version": 2, "files": {**BASE_FILES, "../../etc/x.yml": "a: 1"}}
    )
    assert escape.status_code == 422 and escape.json()["errors"][0]["file"] == "../../etc/x.yml"

    malformed = await client.put("/admin/api/rails", headers=AUTH, json={"base_version": 2, "files": {"a.yml": 1}})
    assert malformed.status_code == 422 and error_of(malformed)["code"] == "invalid_request"

    assert state.rails.current is serving
    versions = (await client.get("/admin/api/rails/versions", headers=AUTH)).json()
    assert versions["live_version"] == 2 and [v["version"] for v in versions["versions"]] == [2, 1]


async def test_validate_reports_errors_with_file_and_line(admin: tuple[httpx.AsyncClient, AppState]) -> None:
    client, state = admin
    broken = {**BASE_FILES, "flows.yaml": "a: 1\nb: [2\n"}
    report = (await client.post("/admin/api/rails/validate", headers=AUTH, json={"files": broken})).json()
    assert report["valid"] is False
    assert [(e["file"], e["line"]) for e in report["errors"]] == [("flows.yaml", 3)]
    good = await client.post("/admin/api/rails/validate", headers=AUTH, json={"files": with_blocked(["bomb", "gun"])})
    assert good.json() == {"valid": True, "errors": [], "tests": [{"name": "blocks bomb", "passed": True}]}
    rejected = await client.post("/admin/api/rails/validate", headers=AUTH, json={"files": {"x.py": "import os"}})
    assert rejected.json()["valid"] is False and rejected.json()["errors"][0]["file"] == "x.py"
    assert state.rails.current.version == "1"


async def test_try_a_draft_without_publishing(admin: tuple[httpx.AsyncClient, AppState]) -> None:
    client, state = admin
    body = {"files": with_blocked(["bomb", "gun"]), "message": "sell me a gun", "answer": "no"}
    decision = (await client.post("/admin/api/rails/try", headers=AUTH, json=body)).json()
    assert decision["input"]["allowed"] is False
    assert decision["input"]["rails"][0]["name"] == "blocked_words_input"
    assert decision["output"]["allowed"] is True
    invalid = await client.post("/admin/api/rails/try", headers=AUTH, json={"files": {"/abs.yml": ""}, "message": "x"})
    assert invalid.status_code == 422
    assert state.rails.current.version == "1"


async def test_versions_diff_and_rollback(admin: tuple[httpx.AsyncClient, AppState]) -> None:
    client, state = admin
    await client.put(
        "/admin/api/rails",
        headers=AUTH,
        json={"base_version": 1, "files": with_blocked(["bomb", "gun"]), "message": "m"},
    )
    one = (await client.get("/admin/api/rails/versions/1", headers=AUTH)).json()
    assert one["files"] == BASE_FILES and one["author"] == "seed" and one["created_at"]
    missing = await client.get("/admin/api/rails/versions/9", headers=AUTH)
    assert missing.status_code == 404 and error_of(missing)["code"] == "rails_version_not_found"

    diff = (await client.get("/admin/api/rails/diff", params={"from": 1, "to": 2}, headers=AUTH)).json()
    assert diff["from"] == 1 and "+gun\n" in diff["diff"] and "+++ v2/blocked_words.txt" in diff["diff"]
    default = (await client.get("/admin/api/rails/diff", headers=AUTH)).json()
    assert default == diff

    rolled = await client.post("/admin/api/rails/rollback", headers=AUTH, json={"version": 1, "author": "bob"})
    assert rolled.status_code == 200
    assert (rolled.json()["version"], rolled.json()["rollback_of"], rolled.json()["author"]) == (3, 1, "bob")
    assert state.rails.current.version == "3" and state.rails.current.files == BASE_FILES
    assert (await client.get("/admin/api/rails/diff?from=1&to=3", headers=AUTH)).json()["diff"] == ""
    gone = await client.post("/admin/api/rails/rollback", headers=AUTH, json={"version": 42})
    assert gone.status_code == 404 and state.rails.current.version == "3"
