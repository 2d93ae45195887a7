"""Knowledge base management: list, upload (ingested at once) and delete documents.

Uploads are saved under `knowledge_dir/uploads/` with a sanitised file name (no directory parts,
no path escape) and ingested immediately; the retriever reloads so /v1/search and chat see the
change on the next request. Ingests are serialised (an asyncio lock here, a file lock in ingest()).
With Redis, every upload and deletion is then published to the other replicas (app/rag/shared_knowledge.py);
when that fails the answer is 503 `knowledge_store_unavailable`: the change was made on this replica only.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
import uuid
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, File, UploadFile

from app.api.deps import StateDep
from app.api.errors import APIError
from app.rag.index import load_snapshot
from app.rag.ingest import IngestReport, ingest
from app.rag.loaders import SUPPORTED_SUFFIXES, max_file_bytes
from app.rag.shared_knowledge import EXTRAS_KEY, SharedKnowledge, SharedKnowledgeUnavailable, ingest_lock
from app.state import AppState

router = APIRouter(tags=["knowledge"])

UPLOADS_DIR = "uploads"
MAX_FILES_PER_REQUEST = 20
READ_BLOCK = 1 << 20
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str | None) -> str:
    """A file name safe to create in the uploads dir: the last path component only, ASCII letters,
    digits, dot, dash and underscore; no leading dots. Raises ValueError when nothing usable is left
    or the type is not supported."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    suffix = PurePosixPath(base).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"Unsupported file type {suffix or '(none)'!r}; supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}."
        )
    stem = _UNSAFE_CHARS.sub("-", base[: -len(suffix)]).strip(".-_")[:100]
    if not stem or stem.lower() == "readme":
        stem = f"upload-{uuid.uuid4().hex[:8]}"
    return f"{stem}{suffix}"


def _ingest_lock(state: AppState) -> asyncio.Lock:
    return ingest_lock(state.extras)


def _shared(state: AppState) -> SharedKnowledge | None:
    shared: SharedKnowledge | None = state.extras.get(EXTRAS_KEY)
    return shared


def _store_unavailable(exc: SharedKnowledgeUnavailable, what: str) -> APIError:
    return APIError(
        503,
        f"{what} on this replica only: {exc}. Repeat the request once the store is back.",
        "knowledge_store_unavailable",
    )


def _documents(state: AppState) -> dict[str, dict[str, Any]]:
    if state.retriever is not None:
        docs: dict[str, dict[str, Any]] = state.retriever.snapshot.documents
        return docs
    return load_snapshot(state.settings.index_dir, gpu=False).documents


def _reload(state: AppState) -> None:
    if state.retriever is not None:
        state.retriever.reload()


def _public(doc_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry without server paths."""
    return {
        "document_id": doc_id,
        "source": entry.get("source"),
        "title": entry.get("title"),
        "format": entry.get("format"),
        "chunks": entry.get("chunks", 0),
        "bytes": entry.get("bytes"),
        "pages": entry.get("pages"),
        "ingested_at": entry.get("ingested_at"),
    }


@router.get("/api/knowledge")
async def list_documents(state: StateDep) -> dict[str, Any]:
    docs = _documents(state)
    items = [_public(doc_id, entry) for doc_id, entry in sorted(docs.items())]
    return {"documents": items, "total_documents": len(items), "total_chunks": sum(d["chunks"] for d in items)}


async def _save_upload(upload: UploadFile, target: Path, limit: int) -> None:
    """Streams to a temp file next to the target, then renames (a failed upload never leaves half a file)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    size = 0
    try:
        with tmp.open("wb") as fh:
            while block := await upload.read(READ_BLOCK):
                size += len(block)
                if size > limit:
                    raise ValueError(f"The file is larger than the limit of {limit:,} bytes.")
                fh.write(block)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


@router.post("/api/knowledge")
async def upload_documents(state: StateDep, files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
    if not files:
        raise APIError(400, "No files were uploaded.", "invalid_request")
    if len(files) > MAX_FILES_PER_REQUEST:
        raise APIError(400, f"At most {MAX_FILES_PER_REQUEST} files per upload.", "too_many_files")
    settings = state.settings
    uploads = (settings.knowledge_dir / UPLOADS_DIR).resolve()
    limit = max_file_bytes(settings)
    results: list[dict[str, Any]] = []
    async with _ingest_lock(state):
        uploads.mkdir(parents=True, exist_ok=True)
        saved: dict[str, tuple[str, Path, bytes | None]] = {}  # target path -> (original name, path, old bytes)
        for upload in files:
            try:
                name = safe_filename(upload.filename)
                target = uploads / name
                if target.resolve().parent != uploads:  # defence in depth; safe_filename already prevents it
                    raise ValueError("Invalid file name.")
                if str(target) in saved:
                    raise ValueError(f"Another file in this upload is also named {name!r}.")
                previous = target.read_bytes() if target.is_file() else None
                await _save_upload(upload, target, limit)
                saved[str(target)] = (upload.filename or name, target, previous)
            except ValueError as exc:
                results.append(
                    {"filename": upload.filename, "status": "error", "message": str(exc), "code": "rejected"}
                )
        if saved:
            paths = [path for _, path, _ in saved.values()]
            report: IngestReport = await asyncio.to_thread(
                ingest, paths, settings, embedder=state.embedder, progress=False, prune=False
            )
            kept: list[Path] = []  # added, updated or unchanged: what the other replicas must have too
            for file_result in report.files:
                original, path, previous = saved[file_result.path]
                if file_result.status != "error":
                    kept.append(path)
                if file_result.status == "error":
                    # Keep the uploads dir in step with the index: restore or remove the rejected file.
                    if previous is not None:
                        path.write_bytes(previous)
                    else:
                        path.unlink(missing_ok=True)
                results.append(
                    {
                        "filename": original,
                        "saved_as": f"{UPLOADS_DIR}/{path.name}",
                        "document_id": file_result.document_id,
                        "status": file_result.status,
                        "chunks": file_result.chunks,
                        "message": file_result.message,
                        "code": file_result.code,
                    }
                )
            await asyncio.to_thread(_reload, state)
            await _share_uploads(state, kept)
    ok = sum(1 for r in results if r["status"] != "error")
    return {"results": results, "ingested": ok, "errors": len(results) - ok}


@router.delete("/api/knowledge/{document_id:path}")
async def delete_document(document_id: str, state: StateDep) -> dict[str, Any]:
    async with _ingest_lock(state):
        entry = _documents(state).get(document_id)
        if entry is None:
            raise APIError(404, f"Unknown document {document_id!r}.", "document_not_found")
        report = await asyncio.to_thread(
            ingest, [], state.settings, embedder=state.embedder, delete_ids=[document_id], progress=False
        )
        if report.errors:
            raise APIError(404, report.errors[0].message or "Unknown document.", "document_not_found")
        # An uploaded file is removed too, or the next directory ingest would bring it back.
        path = Path(entry.get("path", ""))
        uploads = (state.settings.knowledge_dir / UPLOADS_DIR).resolve()
        removed_file = path.is_relative_to(uploads) and path.is_file()
        if removed_file:
            path.unlink()
        await asyncio.to_thread(_reload, state)
        shared = _shared(state)
        if shared is not None:
            try:
                await shared.publish_deletion(document_id, path)
            except SharedKnowledgeUnavailable as exc:
                raise _store_unavailable(exc, f"Deleted {document_id!r}") from exc
    return {"deleted": document_id, "chunks": entry.get("chunks", 0), "file_removed": removed_file}


async def _share_uploads(state: AppState, paths: list[Path]) -> None:
    shared = _shared(state)
    if shared is None or not paths:
        return
    try:
        await shared.publish_uploads(paths)
    except SharedKnowledgeUnavailable as exc:
        raise _store_unavailable(exc, "Indexed") from exc
