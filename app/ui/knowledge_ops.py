"""The admin console's Knowledge tab without Gradio: list, upload, delete and re-index documents with the
RAG package's own incremental `ingest` (app/rag/ingest.py), then make the live retriever load the new
index version. Uploads are stored under `<knowledge_dir>/uploads/` so a full re-index keeps them. With
Redis, uploads and deletions are published to the other replicas too (app/rag/shared_knowledge.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from app.rag.shared_knowledge import EXTRAS_KEY, SharedKnowledge, SharedKnowledgeUnavailable, ingest_lock
from app.state import AppState

UPLOAD_SUBDIR = "uploads"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_upload_name(name: str) -> str:
    """A file name that cannot escape the uploads folder or hide itself."""
    base = Path(name.replace("\\", "/")).name
    cleaned = _UNSAFE_NAME.sub("-", base).strip(".-") or "document"
    return cleaned[:120]


def list_documents(state: AppState) -> list[list[Any]]:
    """Rows `document id, title, chunks, updated` of the live index (empty when RAG is off)."""
    if state.retriever is None:
        return []
    rows = []
    for doc in state.retriever.documents():
        rows.append(
            [
                doc.get("document_id"),
                doc.get("title") or doc.get("source") or "",
                doc.get("chunks", ""),
                doc.get("updated_at") or doc.get("ingested_at") or "",
            ]
        )
    return rows


def document_ids(state: AppState) -> list[str]:
    return [str(row[0]) for row in list_documents(state)]


def _reload_retriever(state: AppState) -> None:
    if state.retriever is not None:
        state.retriever.reload()


def report_markdown(report: Any) -> str:
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    lines = [
        f"**Index version** `{data.get('version')}` — {data.get('total_documents')} documents, "
        f"{data.get('total_chunks')} chunks ({data.get('chunks_added', 0)} added, "
        f"{data.get('chunks_removed', 0)} removed) in {float(data.get('seconds') or 0):.1f} s"
    ]
    for file in data.get("files") or []:
        if file.get("status") == "skipped":
            continue
        message = f" — {file['message']}" if file.get("message") else ""
        lines.append(f"- `{file.get('document_id') or file.get('path')}`: {file.get('status')}{message}")
    return "\n".join(lines)


async def upload(state: AppState, paths: Sequence[str | Path], *, progress: bool = False) -> str:
    """Copies the uploaded files into the knowledge dir, ingests exactly those and shares them."""
    from app.rag.ingest import ingest

    settings = state.settings
    target_dir = Path(settings.knowledge_dir) / UPLOAD_SUBDIR
    async with ingest_lock(state.extras):
        target_dir.mkdir(parents=True, exist_ok=True)
        stored = []
        for path in paths:
            destination = target_dir / safe_upload_name(Path(path).name)
            shutil.copyfile(path, destination)
            stored.append(destination)
        report = await asyncio.to_thread(
            ingest, stored, settings, embedder=state.embedder, progress=progress, prune=False
        )
        # Files the loader rejected must not stay behind to break the next full re-index.
        for result in report.errors:
            Path(result.path).unlink(missing_ok=True)
        _reload_retriever(state)
        rejected = {result.path for result in report.errors}
        note = await _share(state, lambda shared: shared.publish_uploads(p for p in stored if str(p) not in rejected))
    return report_markdown(report) + note


async def delete(state: AppState, document_id: str) -> str:
    """Removes a document from the index, and its uploaded file (so a re-index does not bring it back)."""
    from app.rag.ingest import ingest

    settings = state.settings
    async with ingest_lock(state.extras):
        report = await asyncio.to_thread(
            ingest, [], settings, embedder=state.embedder, delete_ids=[document_id], progress=False, prune=False
        )
        knowledge_dir = Path(settings.knowledge_dir).resolve()
        uploaded = None
        for candidate in knowledge_dir.glob(f"{document_id}.*"):
            if candidate.resolve().is_relative_to(knowledge_dir / UPLOAD_SUBDIR):
                candidate.unlink(missing_ok=True)
                uploaded = candidate
        _reload_retriever(state)
        note = ""
        if not report.errors:
            note = await _share(state, lambda shared: shared.publish_deletion(document_id, uploaded))
    return report_markdown(report) + note


async def _share(state: AppState, publish: Callable[[SharedKnowledge], Awaitable[int]]) -> str:
    """Publishes a change to the other replicas; a markdown warning when it could not be."""
    shared: SharedKnowledge | None = state.extras.get(EXTRAS_KEY)
    if shared is None:
        return ""
    try:
        await publish(shared)
    except SharedKnowledgeUnavailable as exc:
        return f"\n\n**Warning:** made on this replica only ({exc}); repeat it once the store is back."
    return ""


async def reindex(state: AppState, *, progress: bool = False) -> str:
    """Re-ingests the whole knowledge dir (unchanged files are skipped; files gone are pruned)."""
    from app.rag.ingest import ingest_directory

    async with ingest_lock(state.extras):
        report = await asyncio.to_thread(
            ingest_directory, None, state.settings, embedder=state.embedder, progress=progress
        )
        _reload_retriever(state)
    shared: SharedKnowledge | None = state.extras.get(EXTRAS_KEY)
    if shared is not None:  # the re-index brought back shipped documents deleted on some replica: drop them again
        with contextlib.suppress(Exception):  # the follower retries on its own
            await shared.resync()
    return report_markdown(report)
