"""The admin console's Knowledge tab without Gradio: list, upload, delete and re-index documents with the
knowledge service the REST API calls too (app/rag/knowledge_admin.py: naming, size limit, rollback of rejected
files, sharing with the other replicas), rendered as markdown for the console.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.rag import knowledge_admin
from app.rag.knowledge_admin import KnowledgeChange, LocalFile
from app.state import AppState


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


def _warning(not_shared: str | None) -> str:
    if not_shared is None:
        return ""
    return f"\n\n**Warning:** made on this replica only ({not_shared}); repeat it once the store is back."


def change_markdown(change: KnowledgeChange) -> str:
    """The ingest report, then the files refused before ingest (name, type or size), then any sharing warning."""
    lines = [report_markdown(change.report)] if change.report is not None else []
    lines += [f"- `{f.filename}`: not uploaded — {f.message}" for f in change.files if f.code == "rejected"]
    return "\n".join(lines) + _warning(change.not_shared)


async def upload(state: AppState, paths: Sequence[str | Path], *, progress: bool = False) -> str:
    """Uploads the files Gradio saved (the same naming, limits, rollback and sharing as the REST API)."""
    files = [LocalFile(Path(path)) for path in paths]
    return change_markdown(await knowledge_admin.upload(state, files, progress=progress))


async def delete(state: AppState, document_id: str) -> str:
    """Removes a document from the index, and its uploaded file (so a re-index does not bring it back)."""
    deleted = await knowledge_admin.delete(state, document_id)
    if deleted is None:
        return f"Unknown document `{document_id}`."
    entry, removed_file, not_shared = deleted
    removed = " and its uploaded file" if removed_file else ""
    return f"Deleted `{document_id}` ({entry.get('chunks', 0)} chunks){removed}." + _warning(not_shared)


async def reindex(state: AppState, *, progress: bool = False) -> str:
    """Re-ingests the whole knowledge dir (unchanged files are skipped; files gone are pruned)."""
    return report_markdown(await knowledge_admin.reindex(state, progress=progress))
