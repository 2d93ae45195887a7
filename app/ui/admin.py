"""The admin console at `/admin`: a login box, then the Rails editor (edit, validate, try the draft,
publish, version history with diffs and rollback) and the Knowledge tab (upload, delete, re-index).

The token typed into the login box is kept in server-side gr.State and checked again by every action,
so calling an event without logging in does nothing. All work goes through app/ui/admin_ops.py and
app/ui/knowledge_ops.py (the same RailsPublisher and ingest code as the REST API).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import gradio as gr

from app.api.security import admin_token, is_admin_token
from app.settings import Settings
from app.state import AppState
from app.ui import admin_ops as ops
from app.ui import knowledge_ops as kops

log = logging.getLogger(__name__)

StateGetter = Callable[[], AppState]
NOT_LOGGED_IN = "🔒 Please log in again."
VERSION_HEADERS = ["version", "", "created", "author", "message"]
DOCUMENT_HEADERS = ["document", "title", "chunks", "updated"]
# Gradio injects a live progress bar for a gr.Progress default; track_tqdm follows ingest's tqdm bars.
TQDM_PROGRESS = gr.Progress(track_tqdm=True)


def _guarded(settings: Settings, n_outputs: int) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
    """Wraps an action whose first argument is the session's token: refuses without a valid token, and turns
    any exception into a message in the last output (the status box) instead of a traceback."""

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def wrapper(token: str | None, *args: Any, **kwargs: Any) -> Any:
            def status_only(message: str) -> Any:
                return message if n_outputs == 1 else tuple([gr.skip()] * (n_outputs - 1) + [message])

            if not is_admin_token(settings, token):
                return status_only(NOT_LOGGED_IN)
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                text = ops.store_error_text(exc)
                if text is None:
                    log.warning("admin action %s failed", fn.__name__, exc_info=exc)
                    text = f"The action failed: {type(exc).__name__}. See the server log."
                return status_only("❌ " + text)

        # Gradio reads the signature to map inputs and to inject gr.Progress: show it the token + fn's own.
        signature = inspect.signature(fn)
        token_param = inspect.Parameter("token", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[token_param, *signature.parameters.values()]
        )
        wrapper.__name__ = fn.__name__
        return wrapper

    return decorate


def build_admin(get_state: StateGetter, settings: Settings) -> gr.Blocks:
    guarded = functools.partial(_guarded, settings)

    # --- rails -------------------------------------------------------------------------------------

    def editor_for(files: dict[str, str], path: str | None) -> Any:
        language: Any = ops.code_language(path or "")  # one of gr.Code's language literals, or None
        return gr.Code(value=files.get(path or "", ""), language=language, label=path or "file")

    async def reload_live() -> tuple[Any, ...]:
        number, files = await ops.load_live(get_state())
        first = sorted(files)[0] if files else None
        live, rows = await ops.versions_table(get_state())
        return (
            number, files, gr.Dropdown(choices=sorted(files), value=first), first, editor_for(files, first),
            rows, f"Editing a draft of live version **{number}**.",
        )

    async def switch_file(files: dict[str, str], previous: str | None, text: str, path: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, previous, text)
        return files, path, editor_for(files, path), f"Editing `{path}` (unpublished edits are kept in the draft)."

    async def add_file(files: dict[str, str], previous: str | None, text: str, new_path: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, previous, text)
        new_path = (new_path or "").strip()
        if not new_path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), "Type a file name, e.g. `topics_extra.co`."
        files.setdefault(new_path, "")
        return files, new_path, gr.Dropdown(choices=sorted(files), value=new_path), editor_for(files, new_path), (
            f"Added `{new_path}` to the draft (it is checked on Validate)."
        )

    async def validate(files: dict[str, str], path: str | None, text: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        return files, await ops.validate(get_state(), files)

    async def try_it(files: dict[str, str], path: str | None, text: str, message: str, answer: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        return files, await ops.try_draft(get_state(), files, message, answer)

    async def evaluate(files: dict[str, str], path: str | None, text: str, dataset: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        return files, await ops.eval_draft(get_state(), files, dataset)

    async def publish(base: int, files: dict[str, str], path: str | None, text: str, message: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        number, status = await ops.publish(get_state(), base, files, message)
        _, rows = await ops.versions_table(get_state())
        return number, files, rows, status

    async def show_diff(number: float | None) -> tuple[Any, ...]:
        if not number:
            return gr.skip(), "Pick a version number."
        diff = await ops.version_diff(get_state(), int(number))
        return diff, f"Changes in version {int(number)}."

    async def rollback(number: float | None) -> tuple[Any, ...]:
        if not number:
            return (*([gr.skip()] * 6), "Pick the version to roll back to.")
        _, status = await ops.rollback(get_state(), int(number))
        loaded = await reload_live()  # the editor follows the new live version
        return (*loaded[:5], loaded[5], status)

    # --- knowledge ----------------------------------------------------------------------------------

    def documents_view() -> tuple[Any, Any]:
        state = get_state()
        return kops.list_documents(state), gr.Dropdown(choices=kops.document_ids(state), value=None)

    async def refresh_documents() -> tuple[Any, ...]:
        rows, ids = documents_view()
        return rows, ids, f"{len(rows)} documents in the live index."

    async def upload(paths: list[str] | None, progress: gr.Progress = TQDM_PROGRESS) -> tuple[Any, ...]:
        if not paths:
            return gr.skip(), gr.skip(), "Choose files to upload first."
        report = await kops.upload(get_state(), paths, progress=True)
        return (*documents_view(), report)

    async def delete(document_id: str | None) -> tuple[Any, ...]:
        if not document_id:
            return gr.skip(), gr.skip(), "Pick a document to delete."
        report = await kops.delete(get_state(), document_id)
        return (*documents_view(), report)

    async def reindex(progress: gr.Progress = TQDM_PROGRESS) -> tuple[Any, ...]:
        report = await kops.reindex(get_state(), progress=True)
        return (*documents_view(), report)

    # --- login --------------------------------------------------------------------------------------

    async def login(token: str) -> tuple[Any, ...]:
        if not is_admin_token(settings, token):
            reason = "no admin token is configured" if admin_token(settings) is None else "wrong token"
            return None, gr.Column(visible=True), gr.Column(visible=False), f"❌ Login failed: {reason}.", ""
        return token, gr.Column(visible=False), gr.Column(visible=True), "", ""

    def logout() -> tuple[Any, ...]:
        return None, gr.Column(visible=True), gr.Column(visible=False)

    with gr.Blocks(title="guardchat · admin", analytics_enabled=False) as demo:
        token = gr.State(None)
        base_version = gr.State(0)
        draft = gr.State({})
        current_file = gr.State(None)
        gr.HTML('<div class="gc-header"><b>Larkspur Bank</b> · guardchat admin console</div>')

        with gr.Column(visible=True, elem_id="gc-login") as login_box:
            token_box = gr.Textbox(label="Admin token", type="password", elem_id="gc-admin-token")
            login_btn = gr.Button("Log in", variant="primary", elem_id="gc-login-btn")
            login_msg = gr.Markdown(elem_id="gc-login-msg")

        with gr.Column(visible=False, elem_id="gc-console") as console:
            logout_btn = gr.Button("Log out", size="sm", elem_id="gc-logout")
            with gr.Tabs():
                with gr.Tab("Rails editor", id="rails"):
                    status = gr.Markdown(elem_id="gc-rails-status")
                    with gr.Row():
                        file_pick = gr.Dropdown(label="File", choices=[], elem_id="gc-file", scale=3)
                        new_name = gr.Textbox(
                            label="New file", placeholder="topics_extra.co", scale=2, elem_id="gc-new-file"
                        )
                        add_btn = gr.Button("Add file", scale=1, elem_id="gc-add-file")
                    editor = gr.Code(language="yaml", lines=18, max_lines=40, elem_id="gc-editor", interactive=True)
                    with gr.Row():
                        validate_btn = gr.Button("Validate", elem_id="gc-validate")
                        reload_btn = gr.Button("Reload live (discard draft)", elem_id="gc-reload")
                    with gr.Accordion("Try it against the draft (nothing is published)", open=True):
                        try_message = gr.Textbox(label="User message", elem_id="gc-try-message")
                        try_answer = gr.Textbox(label="Assistant answer (optional, runs the output rails)")
                        try_btn = gr.Button("Try it", elem_id="gc-try")
                        try_result = gr.Markdown(elem_id="gc-try-result")
                    with gr.Accordion("Evaluate the draft on a labelled dataset (nothing is published)", open=False):
                        eval_pick = gr.Dropdown(
                            label="Dataset", choices=list(ops.EVAL_DATASETS), elem_id="gc-eval-dataset"
                        )
                        eval_btn = gr.Button("Run evaluation", elem_id="gc-eval")
                        eval_result = gr.Markdown(elem_id="gc-eval-result")
                    with gr.Row():
                        publish_message = gr.Textbox(label="Publish message", scale=4, elem_id="gc-publish-message")
                        publish_btn = gr.Button("Publish", variant="primary", scale=1, elem_id="gc-publish")
                    result = gr.Markdown(elem_id="gc-rails-result")
                with gr.Tab("Versions", id="versions"):
                    versions = gr.Dataframe(
                        headers=VERSION_HEADERS, interactive=False, elem_id="gc-versions", wrap=True
                    )
                    with gr.Row():
                        version_pick = gr.Number(label="Version", precision=0, elem_id="gc-version-number")
                        diff_btn = gr.Button("Show diff", elem_id="gc-diff")
                        rollback_btn = gr.Button("Roll back to this version", variant="stop", elem_id="gc-rollback")
                    versions_status = gr.Markdown(elem_id="gc-versions-status")
                    diff_view = gr.Code(
                        language=None, label="Diff against the previous version", elem_id="gc-diff-view"
                    )
                with gr.Tab("Knowledge", id="knowledge"):
                    documents = gr.Dataframe(headers=DOCUMENT_HEADERS, interactive=False, elem_id="gc-documents")
                    uploads = gr.File(label="Upload documents (.md .txt .html .pdf)", file_count="multiple",
                                      type="filepath", elem_id="gc-upload")
                    with gr.Row():
                        upload_btn = gr.Button("Upload and index", variant="primary", elem_id="gc-upload-btn")
                        reindex_btn = gr.Button("Re-index everything", elem_id="gc-reindex")
                        refresh_btn = gr.Button("Refresh list")
                    with gr.Row():
                        doc_pick = gr.Dropdown(label="Document", choices=[], elem_id="gc-doc")
                        delete_btn = gr.Button("Delete from index", variant="stop", elem_id="gc-delete-doc")
                    knowledge_status = gr.Markdown(elem_id="gc-knowledge-status")

        private: dict[str, Any] = {"api_visibility": "private"}
        loaded_outputs = [base_version, draft, file_pick, current_file, editor, versions, status]
        for trigger in (login_btn.click, token_box.submit):
            trigger(login, [token_box], [token, login_box, console, login_msg, token_box], **private).success(
                guarded(7)(reload_live), [token], loaded_outputs, **private
            ).success(guarded(3)(refresh_documents), [token], [documents, doc_pick, knowledge_status], **private)
        logout_btn.click(logout, None, [token, login_box, console], **private)
        reload_btn.click(guarded(7)(reload_live), [token], loaded_outputs, **private)
        file_pick.input(
            guarded(4)(switch_file), [token, draft, current_file, editor, file_pick],
            [draft, current_file, editor, status], **private,
        )
        add_btn.click(
            guarded(5)(add_file), [token, draft, current_file, editor, new_name],
            [draft, current_file, file_pick, editor, status], **private,
        )
        validate_btn.click(guarded(2)(validate), [token, draft, current_file, editor], [draft, result], **private)
        try_btn.click(
            guarded(2)(try_it), [token, draft, current_file, editor, try_message, try_answer], [draft, try_result],
            **private,
        )
        eval_btn.click(
            guarded(2)(evaluate), [token, draft, current_file, editor, eval_pick], [draft, eval_result], **private
        )
        publish_btn.click(
            guarded(4)(publish), [token, base_version, draft, current_file, editor, publish_message],
            [base_version, draft, versions, result], **private,
        )
        diff_btn.click(guarded(2)(show_diff), [token, version_pick], [diff_view, versions_status], **private)
        rollback_btn.click(
            guarded(7)(rollback), [token, version_pick],
            [base_version, draft, file_pick, current_file, editor, versions, versions_status], **private,
        )
        upload_btn.click(guarded(3)(upload), [token, uploads], [documents, doc_pick, knowledge_status], **private)
        delete_btn.click(guarded(3)(delete), [token, doc_pick], [documents, doc_pick, knowledge_status], **private)
        reindex_btn.click(guarded(3)(reindex), [token], [documents, doc_pick, knowledge_status], **private)
        refresh_btn.click(guarded(3)(refresh_documents), [token], [documents, doc_pick, knowledge_status], **private)
    return demo
