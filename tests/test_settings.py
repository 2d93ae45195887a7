"""List settings from the environment and .env (app/settings.py), and how `guardchat` reports a bad setting."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import NoDecode

from app.settings import Settings

LIST_SETTINGS = ("api_keys", "cors_origins", "lora_adapters")


def _values(settings: Settings, name: str) -> list[str]:
    return [v.get_secret_value() if hasattr(v, "get_secret_value") else v for v in getattr(settings, name)]


@pytest.mark.parametrize("name", LIST_SETTINGS)
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a,b", ["a", "b"]),
        (" a , b ,, ", ["a", "b"]),  # trimmed, empty items dropped
        ("solo", ["solo"]),
        ("", []),
        ('["a", "b"]', ["a", "b"]),
        (' [" a ", "", "b,c"] ', ["a", "b,c"]),  # JSON: an item may hold a comma
        ("[]", []),
    ],
)
def test_list_settings_take_comma_separated_values_and_json(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv(f"GUARDCHAT_{name.upper()}", raw)
    assert _values(Settings(_env_file=None), name) == expected


def test_list_settings_from_a_dotenv_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text('GUARDCHAT_API_KEYS=key-1,key-2\nGUARDCHAT_CORS_ORIGINS=["https://a.example"]\n')
    settings = Settings(_env_file=env_file)
    assert _values(settings, "api_keys") == ["key-1", "key-2"]
    assert settings.cors_origins == ["https://a.example"]


def test_every_list_setting_accepts_both_forms() -> None:
    """A list field added later without NoDecode would take JSON only again (and `a,b` would stop the server)."""
    lists = [
        name for name, field in Settings.model_fields.items() if typing.get_origin(field.annotation) is list
    ]
    assert set(lists) >= set(LIST_SETTINGS)
    for name in lists:
        assert NoDecode in Settings.model_fields[name].metadata, f"{name} takes JSON only"


def test_invalid_json_list_is_a_clear_error_without_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDCHAT_API_KEYS", '["secret-key-1", ')
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    (error,) = caught.value.errors(include_input=False)
    assert error["loc"] == ("api_keys",)
    assert "not a valid JSON list" in error["msg"] and "secret-key-1" not in error["msg"]


def _guardchat(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GUARDCHAT_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**clean, **env},
        cwd=tmp_path,  # no .env from the checkout
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_reports_a_bad_setting_in_one_line_per_setting(tmp_path: Path) -> None:
    done = _guardchat(
        tmp_path, "serve", GUARDCHAT_API_KEYS='["secret-key-1",', GUARDCHAT_RAILS_ENGINE="fastest"
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "secret-key-1" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    keys, engine = sorted(lines)
    assert keys.startswith("guardchat: invalid GUARDCHAT_API_KEYS: starts with '[' but is not a valid JSON list")
    assert engine == "guardchat: invalid GUARDCHAT_RAILS_ENGINE: Input should be 'auto', 'compiled' or 'nemo'"
