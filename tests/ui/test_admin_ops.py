"""Admin console helpers that need no server: token check, editor merge, result formatting; the Knowledge tab's
uploads through the knowledge service the REST API uses."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from app.admin.versions import VersionConflict
from app.api.security import is_admin_token
from app.rag.retrieve import HybridRetriever
from app.settings import Settings
from app.state import AppState
from app.ui import knowledge_ops
from app.ui.admin_ops import code_language, merge_edit, outcome_markdown, store_error_text, try_markdown
from tests.rag.conftest import make_settings


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


async def test_console_uploads_are_named_limited_and_rolled_back_as_the_apis_are(tmp_path: Path, embedder) -> None:
    """The Knowledge tab gets Gradio's temp copies; they go through the same service as POST /api/knowledge: a
    sanitised name inside uploads/, the size limit, unsupported types refused, and a re-upload the loader rejects
    leaves the previous file (still indexed) in place instead of deleting it."""
    settings = make_settings(tmp_path).model_copy(update={"ingest_max_file_bytes": 5000})
    state = AppState(settings=settings, llm=None, store=None, embedder=embedder,  # type: ignore[arg-type]
                     retriever=HybridRetriever(settings), rails=None)  # type: ignore[arg-type]
    gradio = tmp_path / "gradio-temp"
    gradio.mkdir()
    good = b"# Pet accounts\n\nThe Larkspur Pet Fund account pays 7% APY for pets."
    files = {"Pet Fund (2024).md": good, "tool.exe": b"MZ", "huge.txt": b"lorem ipsum " * 1000}
    for name, data in files.items():
        (gradio / name).write_bytes(data)
    report = await knowledge_ops.upload(state, [gradio / name for name in files])
    uploads = settings.knowledge_dir / "uploads"
    assert sorted(p.name for p in uploads.iterdir()) == ["Pet-Fund-2024.md"], report
    assert "`tool.exe`: not uploaded — Unsupported file type '.exe'" in report
    assert "`huge.txt`: not uploaded — The file is larger than the limit of 5,000 bytes." in report
    assert "`uploads/Pet-Fund-2024`: added" in report

    (gradio / "Pet Fund (2024).md").write_bytes(os.urandom(200).replace(b"\x00", b"\x01") + b"\x00")
    report = await knowledge_ops.upload(state, [gradio / "Pet Fund (2024).md"])
    assert "`uploads/Pet-Fund-2024`: error" in report
    assert (uploads / "Pet-Fund-2024.md").read_bytes() == good  # restored, not deleted
    assert knowledge_ops.document_ids(state) == ["uploads/Pet-Fund-2024"]
    assert "Unknown document" in await knowledge_ops.delete(state, "uploads/nothing")
    assert "and its uploaded file" in await knowledge_ops.delete(state, "uploads/Pet-Fund-2024")
    assert not (uploads / "Pet-Fund-2024.md").exists() and knowledge_ops.document_ids(state) == []
