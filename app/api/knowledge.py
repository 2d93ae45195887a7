"""Knowledge base management: list, upload (ingested at once) and delete documents.

The work is app/rag/knowledge_admin.py's, shared with the admin console: files are saved under
`knowledge_dir/uploads/` with a sanitised name and ingested at once; the retriever reloads so /v1/search and chat
see the change on the next request. With Redis, every upload and deletion is then published to the other
replicas; when that fails the answer is 503 `knowledge_store_unavailable`: the change was made on this replica
only.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, File, UploadFile

from app.api.deps import StateDep
from app.api.errors import APIError
from app.rag import knowledge_admin
from app.rag.shared_knowledge import index_documents

router = APIRouter(tags=["knowledge"])

MAX_FILES_PER_REQUEST = 20


def _store_unavailable(why: str, what: str) -> APIError:
    return APIError(
        503,
        f"{what} on this replica only: {why}. Repeat the request once the store is back.",
        "knowledge_store_unavailable",
    )


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


def _result(outcome: knowledge_admin.FileOutcome) -> dict[str, Any]:
    """One file's line of the answer; a file rejected before ingest (name, type, size) has no document."""
    if outcome.saved_as is None:
        return {"filename": outcome.filename, "status": outcome.status, "message": outcome.message,
                "code": outcome.code}
    return asdict(outcome)


@router.get("/api/knowledge")
async def list_documents(state: StateDep) -> dict[str, Any]:
    docs = index_documents(state)
    items = [_public(doc_id, entry) for doc_id, entry in sorted(docs.items())]
    return {"documents": items, "total_documents": len(items), "total_chunks": sum(d["chunks"] for d in items)}


@router.post("/api/knowledge")
async def upload_documents(state: StateDep, files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
    if not files:
        raise APIError(400, "No files were uploaded.", "invalid_request")
    if len(files) > MAX_FILES_PER_REQUEST:
        raise APIError(400, f"At most {MAX_FILES_PER_REQUEST} files per upload.", "too_many_files")
    change = await knowledge_admin.upload(state, files)
    if change.not_shared is not None:
        raise _store_unavailable(change.not_shared, "Indexed")
    results = [_result(outcome) for outcome in change.files]
    ok = sum(1 for r in results if r["status"] != "error")
    return {"results": results, "ingested": ok, "errors": len(results) - ok}


@router.delete("/api/knowledge/{document_id:path}")
async def delete_document(document_id: str, state: StateDep) -> dict[str, Any]:
    deleted = await knowledge_admin.delete(state, document_id)
    if deleted is None:
        raise APIError(404, f"Unknown document {document_id!r}.", "document_not_found")
    entry, removed_file, not_shared = deleted
    if not_shared is not None:
        raise _store_unavailable(not_shared, f"Deleted {document_id!r}")
    return {"deleted": document_id, "chunks": entry.get("chunks", 0), "file_removed": removed_file}
