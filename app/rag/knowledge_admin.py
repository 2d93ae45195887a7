"""Knowledge upload, delete and re-index: the one service the REST API (app/api/knowledge.py) and the admin
console's Knowledge tab (app/ui/knowledge_ops.py) both call, so a file is named, limited, ingested, rolled back
and shared the same way whichever door it came in by.

Uploads are saved under `<knowledge_dir>/uploads/` with a sanitised name (`safe_filename`: no directory parts,
a supported suffix, never a hidden file), streamed to a temp file and renamed (a failed copy never leaves half
a file), and ingested at once; a file the loader rejects is restored to its previous bytes or removed, so the
uploads folder stays in step with the index. Ingests are serialised (an asyncio lock here, a file lock in
ingest()). With Redis, every change is then published to the other replicas (app/rag/shared_knowledge.py); when
that fails the outcome says so (`not_shared`): the change was made on this replica only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from app.rag.ingest import IngestReport, ingest, ingest_directory
from app.rag.loaders import SUPPORTED_SUFFIXES, max_file_bytes
from app.rag.shared_knowledge import UPLOADS_DIR, SharedKnowledge, SharedKnowledgeUnavailable, index_documents
from app.state import AppState

READ_BLOCK = 1 << 20
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class Upload(Protocol):
    """An uploaded file as both doors have it: FastAPI's UploadFile, or `LocalFile` (Gradio's temp copy)."""

    filename: str | None

    async def read(self, size: int = -1) -> bytes: ...


@dataclass
class LocalFile:
    """A file on this machine read as an `Upload` (the console gets Gradio's temp copy of each upload)."""

    path: Path
    filename: str | None = None
    _offset: int = 0

    def __post_init__(self) -> None:
        self.filename = self.filename or self.path.name

    async def read(self, size: int = -1) -> bytes:
        def block() -> bytes:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                return fh.read(size)

        data = await asyncio.to_thread(block)
        self._offset += len(data)
        return data


@dataclass
class FileOutcome:
    filename: str | None  # as the client named it
    status: str  # added / updated / unchanged / error
    message: str | None = None
    code: str | None = None  # "rejected" (name, type or size), else the loader's error code
    saved_as: str | None = None  # relative to the knowledge dir
    document_id: str | None = None
    chunks: int = 0


@dataclass
class KnowledgeChange:
    files: list[FileOutcome] = field(default_factory=list)
    report: IngestReport | None = None
    not_shared: str | None = None  # why the other replicas did not get the change (it stands on this one)


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


async def _save(upload: Upload, target: Path, limit: int) -> None:
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


async def _store(uploads: Sequence[Upload], folder: Path, limit: int, change: KnowledgeChange
                 ) -> dict[str, tuple[str | None, Path, bytes | None]]:
    """Saves each upload; target path -> (client's name, path, the bytes it replaced). Rejects go to `change`."""
    saved: dict[str, tuple[str | None, Path, bytes | None]] = {}
    for upload in uploads:
        try:
            name = safe_filename(upload.filename)
            target = folder / name
            if target.resolve().parent != folder:  # defence in depth; safe_filename already prevents it
                raise ValueError("Invalid file name.")
            if str(target) in saved:
                raise ValueError(f"Another file in this upload is also named {name!r}.")
            previous = target.read_bytes() if target.is_file() else None
            await _save(upload, target, limit)
            saved[str(target)] = (upload.filename or name, target, previous)
        except ValueError as exc:
            change.files.append(FileOutcome(upload.filename, "error", str(exc), "rejected"))
    return saved


async def upload(state: AppState, uploads: Sequence[Upload], *, progress: bool = False) -> KnowledgeChange:
    """Saves, ingests exactly these files, reloads the retriever and shares what was kept."""
    settings = state.settings
    folder = (settings.knowledge_dir / UPLOADS_DIR).resolve()
    change = KnowledgeChange()
    async with state.ingest_lock:
        folder.mkdir(parents=True, exist_ok=True)
        saved = await _store(uploads, folder, max_file_bytes(settings), change)
        if not saved:
            return change
        paths = [path for _, path, _ in saved.values()]
        change.report = await asyncio.to_thread(
            ingest, paths, settings, embedder=state.embedder, progress=progress, prune=False
        )
        kept: list[Path] = []  # added, updated or unchanged: what the other replicas must have too
        for result in change.report.files:
            original, path, previous = saved[result.path]
            if result.status == "error":  # keep the uploads folder in step with the index
                if previous is not None:
                    path.write_bytes(previous)
                else:
                    path.unlink(missing_ok=True)
            else:
                kept.append(path)
            change.files.append(FileOutcome(original, result.status, result.message, result.code,
                                            f"{UPLOADS_DIR}/{path.name}", result.document_id, result.chunks))
        await asyncio.to_thread(_reload, state)
        if kept:
            change.not_shared = await _publish(state, lambda shared: shared.publish_uploads(kept))
    return change


async def delete(state: AppState, document_id: str) -> tuple[dict[str, Any], bool, str | None] | None:
    """Removes a document from the index and its uploaded file (so a re-index does not bring it back).
    (manifest entry, file removed, why not shared) — None when no such document is indexed."""
    async with state.ingest_lock:
        entry = index_documents(state).get(document_id)
        if entry is None:
            return None
        report = await asyncio.to_thread(
            ingest, [], state.settings, embedder=state.embedder, delete_ids=[document_id], progress=False,
            prune=False,
        )
        if report.errors:
            return None
        path = Path(entry.get("path", ""))
        uploads = (state.settings.knowledge_dir / UPLOADS_DIR).resolve()
        removed_file = path.is_relative_to(uploads) and path.is_file()
        if removed_file:
            path.unlink()
        await asyncio.to_thread(_reload, state)
        not_shared = await _publish(state, lambda shared: shared.publish_deletion(document_id, path))
    return entry, removed_file, not_shared


async def reindex(state: AppState, *, progress: bool = False) -> IngestReport:
    """Re-ingests the whole knowledge dir (unchanged files are skipped; files gone are pruned)."""
    async with state.ingest_lock:
        report = await asyncio.to_thread(
            ingest_directory, None, state.settings, embedder=state.embedder, progress=progress
        )
        await asyncio.to_thread(_reload, state)
    shared = _shared(state)
    if shared is not None:  # the re-index brought back shipped documents deleted on some replica: drop them again
        with contextlib.suppress(Exception):  # the follower retries on its own
            await shared.resync()
    return report


def _reload(state: AppState) -> None:
    if state.retriever is not None:
        state.retriever.reload()


def _shared(state: AppState) -> SharedKnowledge | None:
    return state.shared_knowledge


async def _publish(state: AppState, publish: Callable[[SharedKnowledge], Awaitable[int]]) -> str | None:
    """Publishes a change to the other replicas; why it could not be, or None."""
    shared = _shared(state)
    if shared is None:
        return None
    try:
        await publish(shared)
    except SharedKnowledgeUnavailable as exc:
        return str(exc)
    return None
