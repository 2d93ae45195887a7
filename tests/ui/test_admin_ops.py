"""Admin console helpers that need no server: token check, editor merge, result formatting, upload names."""

from __future__ import annotations

from pydantic import SecretStr

from app.admin.versions import VersionConflict
from app.api.security import is_admin_token
from app.settings import Settings
from app.ui.admin_ops import code_language, merge_edit, outcome_markdown, store_error_text, try_markdown
from app.ui.knowledge_ops import safe_upload_name


def test_admin_token_check_fails_closed_and_is_the_one_the_api_uses() -> None:
    assert not is_admin_token(Settings(), "anything")  # no token configured: nobody is an admin
    settings = Settings().model_copy(update={"admin_token": SecretStr("s3cret")})
    assert is_admin_token(settings, "s3cret")
    assert not any(is_admin_token(settings, given) for given in ("s3cre", "", None, "s3cret\udc80"))


def test_merge_edit_keeps_unchanged_files_byte_identical() -> None:
    draft = {"config.yml": "a: 1\n", "rails.co": "define flow x\n"}
    assert merge_edit(draft, "config.yml", "a: 1") == draft  # the editor dropped the final newline only
    assert merge_edit(draft, "config.yml", "a: 2")["config.yml"] == "a: 2\n"
    assert merge_edit(draft, "missing.yml", "x") == draft and merge_edit(draft, None, "x") == draft


def test_languages_for_rails_files() -> None:
    assert code_language("config.yml") == "yaml" and code_language("rails.co") == "python"
    assert code_language("notes.txt") is None


def test_outcomes_show_file_and_line() -> None:
    text = outcome_markdown([{"file": "rails.co", "line": 12, "message": "unknown flow"}], [])
    assert "Invalid" in text and "`rails.co:12` — unknown flow" in text
    assert "Valid" in outcome_markdown([], [{"passed": True}]) and "1 rails test(s) passed" in outcome_markdown(
        [], [{"passed": True}]
    )
    failed = outcome_markdown([], [{"passed": False, "name": "crypto", "file": "tests/t.yml"}])
    assert "Invalid" in failed and "crypto" in failed


def test_try_result_and_conflict_messages() -> None:
    result = {
        "input": {"allowed": False, "blocked_by": "topic", "refusal": "Banking only.",
                  "rails": [{"name": "topic", "verdict": "block", "categories": ["ask off topic"], "score": 0.8}]},
        "output": None,
    }
    text = try_markdown(result)
    assert "blocked by `topic`" in text and "| topic | block | ask off topic | 0.800 |" in text
    assert "no longer live" in (store_error_text(VersionConflict(1, 2)) or "")


def test_upload_names_cannot_escape_the_uploads_folder() -> None:
    assert safe_upload_name("../../etc/passwd") == "passwd"
    assert safe_upload_name("C:\\docs\\fees 2024.md") == "fees-2024.md"
    assert safe_upload_name(".hidden.md") == "hidden.md"
