"""Turn one file on disk into text segments for chunking.

Supported: Markdown, plain text, HTML (headings kept as Markdown `#` lines so the header-aware
splitter sees them) and PDF (one segment per page, page numbers kept). Anything we cannot read
raises `IngestError` with a message meant for the person who uploaded the file; the batch goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from app.settings import Settings

DEFAULT_MAX_FILE_BYTES = 20_000_000
SUPPORTED_SUFFIXES = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
DocFormat = Literal["markdown", "text", "html", "pdf"]

# A text file with NUL bytes or many control characters is binary junk renamed to .txt/.md.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f]")
_MD_TITLE = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)


class IngestError(Exception):
    """A file could not be ingested. `code` is stable (API results and tests key on it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Segment:
    text: str
    page: int | None = None  # 1-based PDF page


@dataclass
class LoadedDocument:
    path: Path
    format: DocFormat
    title: str
    segments: list[Segment] = field(default_factory=list)


def max_file_bytes(settings: Settings) -> int:
    return settings.ingest_max_file_bytes


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def read_checked_bytes(path: Path, limit: int) -> bytes:
    """Reads a file after the cheap checks (type, existence, size) so a huge file is never read."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise IngestError("unsupported_type", f"Unsupported file type {suffix or '(none)'!r}; supported: {supported}.")
    if not path.is_file():
        raise IngestError("not_found", "File not found.")
    size = path.stat().st_size
    if size == 0:
        raise IngestError("empty", "The file is empty.")
    if size > limit:
        raise IngestError("too_large", f"The file is {size:,} bytes; the limit is {limit:,} bytes.")
    return path.read_bytes()


def _decode_text(data: bytes) -> str:
    if b"\x00" in data:
        raise IngestError("binary", "The file looks binary, not text.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IngestError("binary", "The file is not valid UTF-8 text.") from None
    if len(_CONTROL_CHARS.findall(text[:20_000])) > 0.01 * min(len(text), 20_000):
        raise IngestError("binary", "The file looks binary, not text.")
    return text


def humanize_stem(path: Path) -> str:
    return re.sub(r"[-_]+", " ", path.stem).strip().capitalize() or path.name


def _load_markdown(path: Path, data: bytes, fmt: DocFormat) -> LoadedDocument:
    text = _decode_text(data)
    match = _MD_TITLE.search(text) if fmt == "markdown" else None
    title = match.group(1).strip() if match else humanize_stem(path)
    return LoadedDocument(path, fmt, title, [Segment(text)])


def _load_html(path: Path, data: bytes) -> LoadedDocument:
    from bs4 import BeautifulSoup

    html = _decode_text(data)
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "nav", "footer", "svg"]):
        tag.decompose()
    title_tag = soup.find("title")
    first_h1 = soup.find("h1")
    # Headings become Markdown so the same header-aware splitter handles HTML and Markdown.
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            heading.replace_with(f"\n\n{'#' * level} {heading.get_text(' ', strip=True)}\n\n")
    for item in soup.find_all("li"):
        item.insert_before("\n- ")
    body = soup.body or soup
    text = re.sub(r"\n{3,}", "\n\n", body.get_text("\n"))
    text = "\n".join(line.strip() for line in text.splitlines())
    title = (title_tag.get_text(strip=True) if title_tag else "") or (
        first_h1.get_text(" ", strip=True) if first_h1 else ""
    )
    return LoadedDocument(path, "html", title or humanize_stem(path), [Segment(text)])


def _load_pdf(path: Path, data: bytes) -> LoadedDocument:
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # corrupt files are reported by us, not logged twice
    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise IngestError("corrupt", "Not a PDF file (missing %PDF header).")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise IngestError("encrypted", "The PDF is password-protected.")
        segments = [Segment(page.extract_text() or "", page=i + 1) for i, page in enumerate(reader.pages)]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except IngestError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as exc:
        raise IngestError("corrupt", f"Could not read the PDF: {type(exc).__name__}: {exc}"[:300]) from None
    segments = [s for s in segments if s.text.strip()]
    if not segments:
        raise IngestError("no_text", "The PDF has no extractable text (scanned images need OCR first).")
    return LoadedDocument(path, "pdf", str(meta_title).strip() or humanize_stem(path), segments)


def load_document(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES, data: bytes | None = None) -> LoadedDocument:
    """Loads one file. Pass `data` when the bytes were already read (and checked) by the caller."""
    if data is None:
        data = read_checked_bytes(path, max_bytes)
    fmt: DocFormat = SUPPORTED_SUFFIXES[path.suffix.lower()]  # type: ignore[assignment]
    if fmt == "pdf":
        doc = _load_pdf(path, data)
    elif fmt == "html":
        doc = _load_html(path, data)
    else:
        doc = _load_markdown(path, data, fmt)
    if not any(s.text.strip() for s in doc.segments):
        raise IngestError("empty", "The file has no text.")
    return doc
