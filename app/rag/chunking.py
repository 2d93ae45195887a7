"""Header-aware chunking (LangChain text splitters) and the chunk metadata every later stage relies on."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.documents import Document
from langchain_text_splitters import MarkdownHeaderTextSplitter, RecursiveCharacterTextSplitter

from app.rag.base import Chunk
from app.rag.loaders import LoadedDocument

if TYPE_CHECKING:
    from app.settings import Settings

_HEADERS = [("#", "h1"), ("##", "h2"), ("###", "h3"), ("####", "h4")]


def chunk_params(settings: Settings) -> tuple[int, int]:
    size = settings.rag_chunk_chars
    overlap = settings.rag_chunk_overlap
    return size, min(overlap, size // 2)


def document_identity(path: Path, knowledge_dir: Path) -> tuple[str, str]:
    """(document_id, source): the path relative to the knowledge dir without / with its suffix,
    e.g. `cards` / `cards.md` or `uploads/fees` / `uploads/fees.pdf`. Files outside the knowledge dir
    are known by their file name alone, so absolute paths never reach users."""
    try:
        rel = path.resolve().relative_to(knowledge_dir.resolve())
    except ValueError:
        rel = Path(path.name)
    return rel.with_suffix("").as_posix(), rel.as_posix()


def _section_of(metadata: dict[str, Any], title: str) -> str:
    parts = [str(metadata[key]) for key in ("h1", "h2", "h3", "h4") if metadata.get(key)]
    if len(parts) > 1 and parts[0] == title:
        parts = parts[1:]  # the document title is already shown; keep the section path short
    return " > ".join(parts)


def split_document(doc: LoadedDocument, *, chunk_chars: int, overlap: int) -> list[Document]:
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_chars, chunk_overlap=overlap)
    pieces: list[Document] = []
    if doc.format in ("markdown", "html"):
        header_splitter = MarkdownHeaderTextSplitter(headers_to_split_on=_HEADERS, strip_headers=True)
        for segment in doc.segments:
            sections = header_splitter.split_text(segment.text)
            for section in sections:
                # The header splitter joins lines with "  \n" (Markdown hard breaks); plain newlines read better.
                section.page_content = section.page_content.replace("  \n", "\n")
                section.metadata = {"section": _section_of(section.metadata, doc.title), "page": segment.page}
            pieces.extend(splitter.split_documents(sections))
    else:
        for segment in doc.segments:
            pieces.extend(splitter.create_documents([segment.text], metadatas=[{"section": "", "page": segment.page}]))
    return [p for p in pieces if p.page_content.strip()]


def chunk_document(
    doc: LoadedDocument, document_id: str, source: str, *, chunk_chars: int, overlap: int
) -> list[dict[str, Any]]:
    """Docstore records: one dict per chunk, the fields of `Chunk` minus the per-query score."""
    records = []
    for i, piece in enumerate(split_document(doc, chunk_chars=chunk_chars, overlap=overlap)):
        content = piece.page_content.strip()
        # The content hash in the id means an edited chunk never reuses an old id (caches stay correct).
        digest = hashlib.sha1(content.encode("utf-8")).hexdigest()[:8]
        records.append(
            {
                "id": f"{document_id}#{i}:{digest}",
                "document_id": document_id,
                "source": source,
                "title": doc.title,
                "section": piece.metadata.get("section", ""),
                "page": piece.metadata.get("page"),
                "content": content,
            }
        )
    return records


def search_text(record: dict[str, Any]) -> str:
    """What is embedded and BM25-indexed: title and section give a chunk its context
    ("the fee" in a chunk under "Premier Checking")."""
    head = record["title"] + (f" — {record['section']}" if record.get("section") else "")
    return f"{head}\n{record['content']}"


def record_to_chunk(record: dict[str, Any], score: float = 0.0, extra: dict[str, Any] | None = None) -> Chunk:
    return Chunk(
        id=record["id"],
        document_id=record["document_id"],
        source=record["source"],
        title=record["title"],
        content=record["content"],
        section=record.get("section") or "",
        page=record.get("page"),
        score=score,
        extra=dict(extra or {}),
    )
