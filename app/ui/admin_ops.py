"""What the admin console does, without Gradio: token check, rails drafts, validate / try / publish /
versions / rollback through the same `RailsPublisher` the REST API (app/api/admin.py) uses, and the
Markdown that shows the results. The console (app/ui/admin.py) only wires these to widgets.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from app.admin.publisher import RailsInvalid, RailsPublisher
from app.admin.versions import StoreEmpty, VersionConflict, VersionNotFound
from app.state import AppState

CONSOLE_AUTHOR = "admin console"


class AdminError(Exception):
    """A failure the console shows as a message (never a traceback)."""


def publisher_of(state: AppState) -> RailsPublisher:
    if state.rails_publisher is None:
        raise AdminError("The rails store is not available on this server.")
    return state.rails_publisher


def code_language(path: str) -> str | None:
    """gr.Code language for a rails file. Colang has no CodeMirror mode; Python's (comments with #,
    quoted strings, indentation blocks) is the closest."""
    lowered = path.lower()
    if lowered.endswith((".yml", ".yaml")):
        return "yaml"
    if lowered.endswith(".co"):
        return "python"
    if lowered.endswith(".md"):
        return "markdown"
    return None


def merge_edit(draft: Mapping[str, str], path: str | None, text: str | None) -> dict[str, str]:
    """The draft with the editor's current text saved under the file it was showing."""
    files = dict(draft)
    if path and text is not None and path in files:
        original = files[path]
        # The browser editor drops a file's final newline; that alone is not an edit.
        if text.rstrip("\n") == original.rstrip("\n"):
            return files
        files[path] = text + "\n" if original.endswith("\n") and not text.endswith("\n") else text
    return files


def _where(error: Mapping[str, Any]) -> str:
    file = str(error.get("file") or "config")
    line = error.get("line")
    return f"{file}:{line}" if line else file


def outcome_markdown(errors: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]]) -> str:
    """Validation errors as `file:line — message` and rails test results, as Markdown."""
    if not errors and all(t.get("passed", True) for t in tests):
        passed = f" ({len(tests)} rails test(s) passed)" if tests else ""
        return f"✅ **Valid**{passed}"
    lines = ["❌ **Invalid**", ""]
    for error in errors:
        lines.append(f"- `{_where(error)}` — {html.escape(str(error.get('message')))}")
    failed = [t for t in tests if not t.get("passed", True)]
    for test in failed:
        name = test.get("name") or test.get("test") or test.get("message") or test.get("input") or "test"
        detail = test.get("detail") or test.get("reason") or test.get("error") or ""
        where = f"`{test['file']}` " if test.get("file") else ""
        lines.append(f"- {where}test **{html.escape(str(name))}** failed {html.escape(str(detail))}".rstrip())
    if tests:
        lines.append(f"\n{len(tests) - len(failed)}/{len(tests)} rails test(s) passed")
    return "\n".join(lines)


def _decision_markdown(title: str, decision: Mapping[str, Any] | None) -> list[str]:
    if decision is None:
        return []
    if decision.get("allowed"):
        head = f"**{title}: allowed**"
    else:
        head = f"**{title}: blocked by `{decision.get('blocked_by') or 'a rail'}`**"
        if decision.get("refusal"):
            head += f" — “{html.escape(str(decision['refusal']))}”"
    lines = [head, "", "| rail | verdict | categories | score |", "|---|---|---|---|"]
    for rail in decision.get("rails") or []:
        score = rail.get("score")
        lines.append(
            f"| {rail.get('name')} | {rail.get('verdict')} | {', '.join(map(str, rail.get('categories') or []))} "
            f"| {'' if score is None else f'{score:.3f}'} |"
        )
    return lines + [""]


def try_markdown(result: Mapping[str, Any]) -> str:
    lines = _decision_markdown("Input rails", result.get("input"))
    return "\n".join(lines + _decision_markdown("Output rails", result.get("output")))


def store_error_text(exc: BaseException) -> str | None:
    if isinstance(exc, VersionConflict):
        return (
            f"Version {exc.base_version} is no longer live (version {exc.live_version} is): someone published "
            "in the meantime. Press “Reload live” and re-apply your edit."
        )
    if isinstance(exc, VersionNotFound):
        return f"Rails version {exc.number} does not exist."
    if isinstance(exc, StoreEmpty):
        return "No rails version has been published yet."
    if isinstance(exc, AdminError):
        return str(exc)
    return None


async def load_live(state: AppState) -> tuple[int, dict[str, str]]:
    live = await publisher_of(state).store.live()
    return live.number, dict(live.files)


async def validate(state: AppState, files: Mapping[str, str]) -> str:
    outcome = await publisher_of(state).validate(files, run_tests=True)
    return outcome_markdown(outcome.errors, outcome.tests)


async def try_draft(state: AppState, files: Mapping[str, str], message: str, answer: str | None) -> str:
    if not message.strip():
        return "Type a user message to try."
    try:
        result = await publisher_of(state).try_draft(files, message, answer=answer or None)
    except RailsInvalid as exc:
        return outcome_markdown(exc.outcome.errors, exc.outcome.tests)
    return try_markdown(result)


async def publish(state: AppState, base_version: int, files: Mapping[str, str], message: str) -> tuple[int, str]:
    """Returns (the live version now, a status line). Nothing changes when validation fails."""
    publisher = publisher_of(state)
    try:
        version = await publisher.publish(
            base_version, files, message.strip() or "Edited in the admin console", CONSOLE_AUTHOR
        )
    except RailsInvalid as exc:
        return base_version, "Not published.\n\n" + outcome_markdown(exc.outcome.errors, exc.outcome.tests)
    return version.number, f"✅ Published version **{version.number}**; the chat uses it from the next turn."


async def rollback(state: AppState, number: int) -> tuple[int, str]:
    publisher = publisher_of(state)
    try:
        version = await publisher.rollback(number, CONSOLE_AUTHOR)
    except RailsInvalid as exc:
        live = await publisher.store.live_number()
        return live, "Rollback refused: that version no longer validates.\n\n" + outcome_markdown(
            exc.outcome.errors, exc.outcome.tests
        )
    return version.number, f"✅ Rolled back: version **{version.number}** has the content of version {number}."


async def versions_table(state: AppState) -> tuple[int, list[list[Any]]]:
    """(live number, rows newest first: version, live?, created, author, message)."""
    store = publisher_of(state).store
    live = await store.live_number()
    rows = []
    for info in sorted(await store.list(), key=lambda v: v.number, reverse=True):
        message = info.message + (f" (rollback of {info.rollback_of})" if info.rollback_of else "")
        rows.append([info.number, "live" if info.number == live else "", info.created_at, info.author, message])
    return live, rows


async def version_diff(state: AppState, number: int) -> str:
    """Unified diff of version `number` against the version before it (the seed against nothing)."""
    store = publisher_of(state).store
    if number <= 1:
        version = await store.get(number)
        return "".join(f"+++ v{number}/{path}\n" + text for path, text in sorted(version.files.items()))
    return await store.diff(number - 1, number) or "(no changes)"


# Datasets an admin can evaluate a draft against (our own labelled sets, shipped with the package).
EVAL_DATASETS = {
    "topic (on-domain vs off-topic/advice)": ("topic", "topic_dev.jsonl"),
    "safety smoke set": ("safety", "safety_smoke.jsonl"),
}


async def eval_draft(state: AppState, files: Mapping[str, str], dataset: str) -> str:
    """Runs the draft's input rails over a labelled dataset and renders the report (nothing is published)."""
    from app.eval import render_guard_markdown
    from app.eval.data import TOPIC_DATA, load_rows

    if dataset not in EVAL_DATASETS:
        return "Pick a dataset."
    kind, filename = EVAL_DATASETS[dataset]
    rows = load_rows([TOPIC_DATA.parent / filename])
    try:
        report = await publisher_of(state).eval_draft(files, rows, kind=kind)
    except RailsInvalid as exc:
        return outcome_markdown(exc.outcome.errors, exc.outcome.tests)
    return render_guard_markdown(report)
