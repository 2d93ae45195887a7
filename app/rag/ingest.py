"""Incremental ingestion: load → chunk → embed (batched) → write a new index version atomically.

A file whose content (and chunking settings) did not change is skipped; a changed file has all its
chunks replaced; `delete` removes documents. A bad file is reported in its `FileResult` and the rest
of the batch goes on. Interrupting an ingest (exception, Ctrl-C, kill -9) leaves the previous
version live: nothing is visible until `write_version` swaps the CURRENT pointer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from app.rag.base import Embedder
from app.rag.bm25 import Bm25Matrix
from app.rag.chunking import chunk_document, chunk_params, document_identity, search_text
from app.rag.index import (
    VERSIONS_DIR,
    bm25_is_current,
    build_faiss_index,
    collect_garbage,
    current_version,
    exact_max_vectors,
    index_kind,
    ingest_lock,
    load_snapshot,
    write_version,
)
from app.rag.loaders import IngestError, is_supported, load_document, max_file_bytes, read_checked_bytes

FileStatus = Literal["added", "updated", "skipped", "deleted", "error"]
# Small batches of length-sorted chunks: least padding on CPU. 8 beat 16 by ~5% with the int8 MiniLM on the
# knowledge base (185 vs 176 chunks/s over 4 alternating rounds; docs/benchmarks.md §3b).
EMBED_BATCH = 8


@dataclass
class FileResult:
    path: str
    document_id: str | None
    status: FileStatus
    chunks: int = 0
    message: str = ""
    code: str | None = None  # IngestError.code for errors


@dataclass
class IngestReport:
    files: list[FileResult] = field(default_factory=list)
    chunks_added: int = 0
    chunks_removed: int = 0
    total_chunks: int = 0
    total_documents: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    version: str | None = None
    index_kind: str = "flat"
    changed: bool = False

    @property
    def chunks_per_s(self) -> float:
        return self.chunks_added / self.embed_seconds if self.embed_seconds > 0 else 0.0

    @property
    def errors(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "error"]

    def count(self, status: FileStatus) -> int:
        return sum(1 for f in self.files if f.status == status)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chunks_per_s": round(self.chunks_per_s, 1)}

    def summary(self) -> str:
        """Human-readable report for the CLI: one line per file that was not skipped, then totals."""
        lines = [
            f"{f.status:8} {f.document_id or f.path}"
            + (f" ({f.chunks} chunks)" if f.chunks else "")
            + (f": {f.message} [{f.code}]" if f.status == "error" else "")
            for f in self.files
            if f.status != "skipped"
        ]
        counts = ", ".join(f"{self.count(s)} {s}" for s in ("added", "updated", "skipped", "deleted", "error"))
        lines.append(
            f"{counts}; {self.chunks_added} chunks embedded ({self.chunks_per_s:.1f} chunks/s), "
            f"{self.chunks_removed} removed; index: {self.total_documents} documents, {self.total_chunks} chunks "
            f"({self.index_kind}), version {self.version or '-'}; {self.seconds:.1f}s"
        )
        return "\n".join(lines)


def _fingerprint(data: bytes, chunk_chars: int, overlap: int) -> str:
    # Chunking settings are part of the fingerprint: changing them re-chunks every document.
    return f"{hashlib.sha256(data).hexdigest()}:c{chunk_chars}o{overlap}"


def embed_batched(embedder: Embedder, texts: list[str], *, progress: bool) -> np.ndarray:
    """Embeds in batches of similar length (less padding: 23 -> 51 chunks/s on 2 cores, identical vectors;
    bench/ingest_layout.py), then restores the input order."""
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    batch = getattr(embedder, "bulk_batch", None) or EMBED_BATCH  # a GPU embedder wants hundreds per pass
    with tqdm(total=len(texts), unit="chunk", desc="embedding", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            out[rows] = np.asarray(embedder.embed([texts[i] for i in rows]), dtype=np.float32)
            bar.update(len(rows))
    return out


def discover_files(directory: Path) -> list[Path]:
    """Supported files under `directory`, recursively, skipping hidden files and folders and READMEs
    (a folder's README describes the folder; it is not knowledge)."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.rglob("*")):
        rel_parts = path.relative_to(directory).parts
        if path.stem.lower() == "readme" or any(p.startswith(".") for p in rel_parts):
            continue
        if path.is_file() and is_supported(path):
            found.append(path)
    return found


def index_exists(settings: Any) -> bool:
    return current_version(settings.index_dir) is not None


def index_is_current(settings: Any) -> bool:
    """An index exists and its stored BM25 matrix was built by today's tokenizer (an older one would be
    rebuilt in memory at every server start until an ingest stores it)."""
    version = current_version(settings.index_dir)
    if version is None:
        return False
    try:
        manifest = json.loads((settings.index_dir / VERSIONS_DIR / version / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return bm25_is_current(manifest)


def expand_paths(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(files, directories): directories are expanded to their supported files."""
    files: list[Path] = []
    directories: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            directories.append(path.resolve())
            files.extend(discover_files(path))
        else:
            files.append(path)
    return files, directories


def ingest(
    paths: Sequence[Path],
    settings: Any,
    *,
    embedder: Embedder,
    delete: Sequence[Path] = (),
    delete_ids: Sequence[str] = (),
    progress: bool = True,
    prune: bool = True,
) -> IngestReport:
    """Adds/updates the documents at `paths` and removes those at `delete` (paths) or `delete_ids`
    (document ids). A directory in `paths` means every supported file in it; with `prune`, documents
    that came from that directory but whose file is gone are deleted too. Returns per-file results;
    writes a new index version only when something changed."""
    started = time.perf_counter()
    index_dir: Path = settings.index_dir
    knowledge_dir: Path = settings.knowledge_dir
    chunk_chars, overlap = chunk_params(settings)
    limit = max_file_bytes(settings)
    files, directories = expand_paths(paths)
    report = IngestReport()
    with ingest_lock(index_dir):
        snapshot = load_snapshot(index_dir, gpu=False)
        documents: dict[str, dict[str, Any]] = {k: dict(v) for k, v in snapshot.documents.items()}
        pending: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for path in files:
            document_id, source = document_identity(path, knowledge_dir)
            try:
                entry_and_records = _prepare(path, document_id, source, documents, pending, limit, chunk_chars, overlap)
            except IngestError as exc:
                report.files.append(FileResult(str(path), document_id, "error", message=exc.message, code=exc.code))
                continue
            if entry_and_records is None:
                chunks = int(documents[document_id].get("chunks", 0))
                report.files.append(FileResult(str(path), document_id, "skipped", chunks, "unchanged"))
                continue
            entry, records = entry_and_records
            status: FileStatus = "updated" if document_id in documents else "added"
            pending[document_id] = (entry, records)
            report.files.append(FileResult(str(path), document_id, status, len(records)))

        stale = _stale_documents(documents, directories, files) if prune else []
        removed = _resolve_deletes(delete, [*delete_ids, *stale], documents, knowledge_dir, pending, report)
        # A BM25 matrix from an older tokenizer (rebuilt in memory on load) is stored even if nothing changed.
        if pending or removed or snapshot.bm25_rebuilt:
            _write_new_version(snapshot, documents, pending, removed, settings, embedder, progress, report)
        else:
            report.version = snapshot.version
            report.index_kind = index_kind(snapshot.index)
            report.total_chunks = len(snapshot)
            report.total_documents = len(documents)
    report.seconds = time.perf_counter() - started
    return report


def _stale_documents(documents: dict[str, dict[str, Any]], directories: list[Path], files: list[Path]) -> list[str]:
    present = {str(p.resolve()) for p in files}
    stale = []
    for doc_id, entry in documents.items():
        entry_path = Path(entry.get("path", ""))
        in_scope = any(entry_path.is_relative_to(d) for d in directories)
        if in_scope and str(entry_path) not in present and not entry_path.exists():
            stale.append(doc_id)
    return stale


def _prepare(
    path: Path,
    document_id: str,
    source: str,
    documents: dict[str, dict[str, Any]],
    pending: dict[str, Any],
    limit: int,
    chunk_chars: int,
    overlap: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Loads and chunks one file; None when it is unchanged since the last ingest."""
    data = read_checked_bytes(path, limit)
    resolved = str(path.resolve())
    if document_id in pending:
        raise IngestError("duplicate_id", f"Another file in this batch already has the document id {document_id!r}.")
    old = documents.get(document_id)
    if old and old.get("path") != resolved and Path(old.get("path", "")).exists():
        raise IngestError("duplicate_id", f"Document id {document_id!r} already belongs to {old.get('source')}.")
    fingerprint = _fingerprint(data, chunk_chars, overlap)
    if old and old.get("fingerprint") == fingerprint:
        return None
    doc = load_document(path, data=data)
    records = chunk_document(doc, document_id, source, chunk_chars=chunk_chars, overlap=overlap)
    if not records:
        raise IngestError("empty", "The file has no text to index.")
    entry = {
        "document_id": document_id,
        "source": source,
        "path": resolved,
        "title": doc.title,
        "format": doc.format,
        "bytes": len(data),
        "fingerprint": fingerprint,
        "chunks": len(records),
        "pages": len(doc.segments) if doc.format == "pdf" else None,
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return entry, records


def _resolve_deletes(
    delete: Iterable[Path],
    delete_ids: Iterable[str],
    documents: dict[str, dict[str, Any]],
    knowledge_dir: Path,
    pending: dict[str, Any],
    report: IngestReport,
) -> set[str]:
    by_path = {entry.get("path"): doc_id for doc_id, entry in documents.items()}
    targets: list[tuple[str, str]] = []
    for raw in delete:
        path = Path(raw)
        doc_id = by_path.get(str(path.resolve())) or document_identity(path, knowledge_dir)[0]
        targets.append((str(path), doc_id))
    targets.extend((doc_id, doc_id) for doc_id in delete_ids)
    removed: set[str] = set()
    for label, doc_id in targets:
        if doc_id in pending:
            report.files.append(
                FileResult(label, doc_id, "error", message="Added and deleted in one batch.", code="conflict")
            )
        elif doc_id not in documents:
            report.files.append(FileResult(label, doc_id, "error", message="Unknown document.", code="unknown"))
        else:
            removed.add(doc_id)
            report.files.append(FileResult(label, doc_id, "deleted", int(documents[doc_id].get("chunks", 0))))
    return removed


def _write_new_version(
    snapshot: Any,
    documents: dict[str, dict[str, Any]],
    pending: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]],
    removed: set[str],
    settings: Any,
    embedder: Embedder,
    progress: bool,
    report: IngestReport,
) -> None:
    new_records = [record for _, records in pending.values() for record in records]
    embed_started = time.perf_counter()
    new_vectors = embed_batched(embedder, [search_text(r) for r in new_records], progress=progress)
    report.embed_seconds = time.perf_counter() - embed_started
    if len(snapshot) and snapshot.embeddings.shape[1] != new_vectors.shape[1]:
        raise ValueError("The embedder's dimension differs from the index; delete the index dir and re-ingest.")

    replaced = set(pending) | removed
    keep_rows = [row for row, chunk in enumerate(snapshot.chunks) if chunk["document_id"] not in replaced]
    chunks = [snapshot.chunks[row] for row in keep_rows] + new_records
    kept_vectors = np.asarray(snapshot.embeddings[keep_rows], dtype=np.float32).reshape(-1, new_vectors.shape[1])
    embeddings = np.vstack([kept_vectors, new_vectors])
    index = build_faiss_index(embeddings, exact_max=exact_max_vectors(settings))
    bm25 = Bm25Matrix.build([search_text(c) for c in chunks])

    for doc_id in removed:
        documents.pop(doc_id, None)
    for doc_id, (entry, _) in pending.items():
        documents[doc_id] = entry
    manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dim": int(embeddings.shape[1]),
        "previous": snapshot.version,
        "documents": documents,
    }
    version = write_version(
        settings.index_dir, chunks=chunks, embeddings=embeddings, index=index, bm25=bm25, manifest=manifest
    )
    collect_garbage(settings.index_dir, keep={v for v in (version, snapshot.version) if v})
    report.version = version
    report.changed = True
    report.index_kind = index_kind(index)
    report.chunks_added = len(new_records)
    report.chunks_removed = len(snapshot) - len(keep_rows)
    report.total_chunks = len(chunks)
    report.total_documents = len(documents)


def ingest_directory(
    directory: Path | None, settings: Any, *, embedder: Embedder, prune: bool = True, progress: bool = True
) -> IngestReport:
    """Ingests every supported file under `directory` (default: the knowledge dir), pruning documents
    whose file is gone."""
    return ingest([directory or settings.knowledge_dir], settings, embedder=embedder, prune=prune, progress=progress)
