"""Admin rails file paths cannot leave the rails dir (app/admin/paths.py, and the admin API end to end)."""

from __future__ import annotations

import pytest

from app.admin.paths import check_files
from tests.fixtures.server import LiveServer
from tests.hardening.conftest import ADMIN_TOKEN, bearer

ESCAPES = [
    "../outside.co",
    "rails/../../outside.co",
    "/etc/cron.d/evil.yml",
    "C:/Windows/evil.yml",
    "..\\..\\evil.co",
    "a/./../../b.co",
    "tests/\x00.yml",
    ".hidden/x.yml",
    "a//b.co",
    "config.yml/../../x.yml",
    "evil.py",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_escaping_paths_are_rejected(path: str) -> None:
    errors = check_files({path: "x: 1\n"})
    assert errors and any(e.file == path for e in errors), errors


def test_admin_api_refuses_escaping_paths_and_changes_nothing(secured_live: LiveServer) -> None:
    admin = bearer(ADMIN_TOKEN)
    with secured_live.client() as client:
        live = client.get("/admin/api/rails", headers=admin).json()
        files = {**live["files"], "../../escaped.co": "define flow x\n  bot refuse"}
        body = {"base_version": live["version"], "files": files, "message": "escape attempt"}
        response = client.put("/admin/api/rails", headers=admin, json=body)
        assert response.status_code == 422, response.text
        assert any(e["file"] == "../../escaped.co" for e in response.json()["errors"])
        assert client.get("/admin/api/rails", headers=admin).json()["version"] == live["version"]
    rails_dir = secured_live.settings.rails_dir
    assert not (rails_dir.parent / "escaped.co").exists() and not (rails_dir.parent.parent / "escaped.co").exists()
