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


Guarded = Callable[[int], Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]]
PRIVATE: dict[str, Any] = {"api_visibility": "private"}


def _editor_for(files: dict[str, str], path: str | None) -> Any:
    language: Any = ops.code_language(path or "")  # one of gr.Code's language literals, or None
    return gr.Code(value=files.get(path or "", ""), language=language, label=path or "file")


class RailsTabs:
    """The Rails editor and Versions tabs: a draft of the live version edited file by file, validated, tried,
    evaluated and published; the version history with diffs and rollback."""

    def __init__(self, get_state: StateGetter, guarded: Guarded, token: gr.State) -> None:
        self.get_state, self.guarded, self.token = get_state, guarded, token

    # --- actions ------------------------------------------------------------------------------------

    async def reload_live(self) -> tuple[Any, ...]:
        number, files = await ops.load_live(self.get_state())
        first = sorted(files)[0] if files else None
        live, rows = await ops.versions_table(self.get_state())
        return (
            number, files, gr.Dropdown(choices=sorted(files), value=first), first, _editor_for(files, first),
            rows, f"Editing a draft of live version **{number}**.",
        )

    async def switch_file(self, files: dict[str, str], previous: str | None, text: str, path: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, previous, text)
        return files, path, _editor_for(files, path), f"Editing `{path}` (unpublished edits are kept in the draft)."

    async def add_file(self, files: dict[str, str], previous: str | None, text: str, new_path: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, previous, text)
        new_path = (new_path or "").strip()
        if not new_path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), "Type a file name, e.g. `topics_extra.co`."
        files.setdefault(new_path, "")
        return files, new_path, gr.Dropdown(choices=sorted(files), value=new_path), _editor_for(files, new_path), (
            f"Added `{new_path}` to the draft (it is checked on Validate)."
        )

    async def validate(self, files: dict[str, str], path: str | None, text: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        return files, await ops.validate(self.get_state(), files)

    async def try_it(
        self, files: dict[str, str], path: str | None, text: str, message: str, answer: str
    ) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        return files, await ops.try_draft(self.get_state(), files, message, answer)

    async def evaluate(self, files: dict[str, str], path: str | None, text: str, dataset: str) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        return files, await ops.eval_draft(self.get_state(), files, dataset)

    async def publish(
        self, base: int, files: dict[str, str], path: str | None, text: str, message: str
    ) -> tuple[Any, ...]:
        files = ops.merge_edit(files, path, text)
        number, status = await ops.publish(self.get_state(), base, files, message)
        _, rows = await ops.versions_table(self.get_state())
        return number, files, rows, status

    async def show_diff(self, number: float | None) -> tuple[Any, ...]:
        if not number:
            return gr.skip(), "Pick a version number."
        diff = await ops.version_diff(self.get_state(), int(number))
        return diff, f"Changes in version {int(number)}."

    async def rollback(self, number: float | None) -> tuple[Any, ...]:
        if not number:
            return (*([gr.skip()] * 6), "Pick the version to roll back to.")
        _, status = await ops.rollback(self.get_state(), int(number))
        loaded = await self.reload_live()  # the editor follows the new live version
        return (*loaded[:5], loaded[5], status)

    # --- layout -------------------------------------------------------------------------------------

    def build(self) -> None:
        self.base_version = gr.State(0)
        self.draft = gr.State({})
        self.current_file = gr.State(None)
        with gr.Tab("Rails editor", id="rails"):
            self._editor_tab()
        with gr.Tab("Versions", id="versions"):
            self.versions = gr.Dataframe(headers=VERSION_HEADERS, interactive=False, elem_id="gc-versions", wrap=True)
            with gr.Row():
                self.version_pick = gr.Number(label="Version", precision=0, elem_id="gc-version-number")
                self.diff_btn = gr.Button("Show diff", elem_id="gc-diff")
                self.rollback_btn = gr.Button("Roll back to this version", variant="stop", elem_id="gc-rollback")
            self.versions_status = gr.Markdown(elem_id="gc-versions-status")
            self.diff_view = gr.Code(language=None, label="Diff against the previous version", elem_id="gc-diff-view")
        self.loaded_outputs = [self.base_version, self.draft, self.file_pick, self.current_file, self.editor,
                               self.versions, self.status]
        self._wire()

    def _editor_tab(self) -> None:
        self.status = gr.Markdown(elem_id="gc-rails-status")
        with gr.Row():
            self.file_pick = gr.Dropdown(label="File", choices=[], elem_id="gc-file", scale=3)
            self.new_name = gr.Textbox(label="New file", placeholder="topics_extra.co", scale=2, elem_id="gc-new-file")
            self.add_btn = gr.Button("Add file", scale=1, elem_id="gc-add-file")
        self.editor = gr.Code(language="yaml", lines=18, max_lines=40, elem_id="gc-editor", interactive=True)
        with gr.Row():
            self.validate_btn = gr.Button("Validate", elem_id="gc-validate")
            self.reload_btn = gr.Button("Reload live (discard draft)", elem_id="gc-reload")
        with gr.Accordion("Try it against the draft (nothing is published)", open=True):
            self.try_message = gr.Textbox(label="User message", elem_id="gc-try-message")
            self.try_answer = gr.Textbox(label="Assistant answer (optional, runs the output rails)")
            self.try_btn = gr.Button("Try it", elem_id="gc-try")
            self.try_result = gr.Markdown(elem_id="gc-try-result")
        with gr.Accordion("Evaluate the draft on a labelled dataset (nothing is published)", open=False):
            self.eval_pick = gr.Dropdown(label="Dataset", choices=list(ops.EVAL_DATASETS), elem_id="gc-eval-dataset")
            self.eval_btn = gr.Button("Run evaluation", elem_id="gc-eval")
            self.eval_result = gr.Markdown(elem_id="gc-eval-result")
        with gr.Row():
            self.publish_message = gr.Textbox(label="Publish message", scale=4, elem_id="gc-publish-message")
            self.publish_btn = gr.Button("Publish", variant="primary", scale=1, elem_id="gc-publish")
        self.result = gr.Markdown(elem_id="gc-rails-result")

    def _wire(self) -> None:
        g, token, draft, current, editor = self.guarded, self.token, self.draft, self.current_file, self.editor
        self.reload_btn.click(g(7)(self.reload_live), [token], self.loaded_outputs, **PRIVATE)
        self.file_pick.input(g(4)(self.switch_file), [token, draft, current, editor, self.file_pick],
                             [draft, current, editor, self.status], **PRIVATE)
        self.add_btn.click(g(5)(self.add_file), [token, draft, current, editor, self.new_name],
                           [draft, current, self.file_pick, editor, self.status], **PRIVATE)
        self.validate_btn.click(g(2)(self.validate), [token, draft, current, editor], [draft, self.result], **PRIVATE)
        self.try_btn.click(g(2)(self.try_it), [token, draft, current, editor, self.try_message, self.try_answer],
                           [draft, self.try_result], **PRIVATE)
        self.eval_btn.click(g(2)(self.evaluate), [token, draft, current, editor, self.eval_pick],
                            [draft, self.eval_result], **PRIVATE)
        self.publish_btn.click(
            g(4)(self.publish), [token, self.base_version, draft, current, editor, self.publish_message],
            [self.base_version, draft, self.versions, self.result], **PRIVATE,
        )
        self.diff_btn.click(g(2)(self.show_diff), [token, self.version_pick], [self.diff_view, self.versions_status],
                            **PRIVATE)
        self.rollback_btn.click(
            g(7)(self.rollback), [token, self.version_pick],
            [self.base_version, draft, self.file_pick, current, editor, self.versions, self.versions_status],
            **PRIVATE,
        )


class KnowledgeTab:
    """The Knowledge tab: the live index's documents; upload, delete, re-index (app/ui/knowledge_ops.py)."""

    def __init__(self, get_state: StateGetter, guarded: Guarded, token: gr.State) -> None:
        self.get_state, self.guarded, self.token = get_state, guarded, token

    def documents_view(self) -> tuple[Any, Any]:
        state = self.get_state()
        return kops.list_documents(state), gr.Dropdown(choices=kops.document_ids(state), value=None)

    async def refresh(self) -> tuple[Any, ...]:
        rows, ids = self.documents_view()
        return rows, ids, f"{len(rows)} documents in the live index."

    async def upload(self, paths: list[str] | None, progress: gr.Progress = TQDM_PROGRESS) -> tuple[Any, ...]:
        if not paths:
            return gr.skip(), gr.skip(), "Choose files to upload first."
        report = await kops.upload(self.get_state(), paths, progress=True)
        return (*self.documents_view(), report)

    async def delete(self, document_id: str | None) -> tuple[Any, ...]:
        if not document_id:
            return gr.skip(), gr.skip(), "Pick a document to delete."
        report = await kops.delete(self.get_state(), document_id)
        return (*self.documents_view(), report)

    async def reindex(self, progress: gr.Progress = TQDM_PROGRESS) -> tuple[Any, ...]:
        report = await kops.reindex(self.get_state(), progress=True)
        return (*self.documents_view(), report)

    def build(self) -> None:
        with gr.Tab("Knowledge", id="knowledge"):
            self.documents = gr.Dataframe(headers=DOCUMENT_HEADERS, interactive=False, elem_id="gc-documents")
            uploads = gr.File(label="Upload documents (.md .txt .html .pdf)", file_count="multiple",
                              type="filepath", elem_id="gc-upload")
            with gr.Row():
                upload_btn = gr.Button("Upload and index", variant="primary", elem_id="gc-upload-btn")
                reindex_btn = gr.Button("Re-index everything", elem_id="gc-reindex")
                refresh_btn = gr.Button("Refresh list")
            with gr.Row():
                doc_pick = gr.Dropdown(label="Document", choices=[], elem_id="gc-doc")
                delete_btn = gr.Button("Delete from index", variant="stop", elem_id="gc-delete-doc")
            self.status = gr.Markdown(elem_id="gc-knowledge-status")
        g, token = self.guarded, self.token
        self.outputs = [self.documents, doc_pick, self.status]
        upload_btn.click(g(3)(self.upload), [token, uploads], self.outputs, **PRIVATE)
        delete_btn.click(g(3)(self.delete), [token, doc_pick], self.outputs, **PRIVATE)
        reindex_btn.click(g(3)(self.reindex), [token], self.outputs, **PRIVATE)
        refresh_btn.click(g(3)(self.refresh), [token], self.outputs, **PRIVATE)


def build_admin(get_state: StateGetter, settings: Settings) -> gr.Blocks:
    guarded: Guarded = functools.partial(_guarded, settings)

    async def login(token: str) -> tuple[Any, ...]:
        if not is_admin_token(settings, token):
            reason = "no admin token is configured" if admin_token(settings) is None else "wrong token"
            return None, gr.Column(visible=True), gr.Column(visible=False), f"❌ Login failed: {reason}.", ""
        return token, gr.Column(visible=False), gr.Column(visible=True), "", ""

    def logout() -> tuple[Any, ...]:
        return None, gr.Column(visible=True), gr.Column(visible=False)

    with gr.Blocks(title="guardchat · admin", analytics_enabled=False) as demo:
        token = gr.State(None)
        gr.HTML('<div class="gc-header"><b>Larkspur Bank</b> · guardchat admin console</div>')
        with gr.Column(visible=True, elem_id="gc-login") as login_box:
            token_box = gr.Textbox(label="Admin token", type="password", elem_id="gc-admin-token")
            login_btn = gr.Button("Log in", variant="primary", elem_id="gc-login-btn")
            login_msg = gr.Markdown(elem_id="gc-login-msg")
        with gr.Column(visible=False, elem_id="gc-console") as console:
            logout_btn = gr.Button("Log out", size="sm", elem_id="gc-logout")
            rails, knowledge = RailsTabs(get_state, guarded, token), KnowledgeTab(get_state, guarded, token)
            with gr.Tabs():
                rails.build()
                knowledge.build()
        for trigger in (login_btn.click, token_box.submit):
            trigger(login, [token_box], [token, login_box, console, login_msg, token_box], **PRIVATE).success(
                guarded(7)(rails.reload_live), [token], rails.loaded_outputs, **PRIVATE
            ).success(guarded(3)(knowledge.refresh), [token], knowledge.outputs, **PRIVATE)
        logout_btn.click(logout, None, [token, login_box, console], **PRIVATE)
    return demo
