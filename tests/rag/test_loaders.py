from __future__ import annotations

from pathlib import Path

import pytest

from app.rag.chunking import chunk_document
from app.rag.loaders import IngestError, load_document
from tests.rag.conftest import make_pdf


def test_markdown_title_and_header_aware_chunks(tmp_path: Path) -> None:
    path = tmp_path / "fees.md"
    path.write_text("# Fee guide\n\n## Wires\nDomestic wires cost $25.\n\n## ATMs\nNon-network ATMs cost $3.\n")
    doc = load_document(path)
    assert doc.title == "Fee guide"
    records = chunk_document(doc, "fees", "fees.md", chunk_chars=900, overlap=100)
    assert [(r["section"], r["content"]) for r in records] == [
        ("Wires", "Domestic wires cost $25."),
        ("ATMs", "Non-network ATMs cost $3."),
    ]
    assert all(r["id"].startswith("fees#") and r["document_id"] == "fees" for r in records)


def test_html_keeps_headings_and_drops_scripts(tmp_path: Path) -> None:
    path = tmp_path / "help.html"
    path.write_text(
        "<html><head><title>Help center</title><script>var secret = 1;</script></head><body>"
        "<h1>Help center</h1><h2>Reset your password</h2><p>Tap <b>Forgot password</b> on the sign-in screen.</p>"
        "<ul><li>Check your email</li><li>Follow the link</li></ul></body></html>"
    )
    doc = load_document(path)
    assert doc.title == "Help center"
    text = doc.segments[0].text
    assert "## Reset your password" in text and "secret" not in text
    records = chunk_document(doc, "help", "help.html", chunk_chars=900, overlap=100)
    assert records[0]["section"] == "Reset your password"
    assert "Forgot password" in records[0]["content"] and "Follow the link" in records[0]["content"]


def test_pdf_pages_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "rates.pdf"
    path.write_bytes(
        make_pdf(["Certificates of deposit earn 4.2% APY.", "Early withdrawal costs 90 days of interest."])
    )
    doc = load_document(path)
    assert doc.format == "pdf" and [s.page for s in doc.segments] == [1, 2]
    records = chunk_document(doc, "rates", "rates.pdf", chunk_chars=900, overlap=100)
    assert [(r["page"], "4.2%" in r["content"]) for r in records] == [(1, True), (2, False)]


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\ngarbage\x00\xff" * 3, "corrupt"),
        ("fake.pdf", b"\x89PNG\r\n\x1a\n\x00\x00binary", "corrupt"),
        ("junk.txt", bytes(range(256)) * 4, "binary"),
        ("latin1.md", "caf\xe9 cr\xe8me".encode("latin-1"), "binary"),
        ("empty.md", b"", "empty"),
        ("blank.txt", b"   \n\n  ", "empty"),
        ("sheet.xlsx", b"PK\x03\x04 something", "unsupported_type"),
        ("noext", b"hello there", "unsupported_type"),
    ],
)
def test_bad_inputs_raise_typed_errors(tmp_path: Path, name: str, data: bytes, code: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(IngestError) as info:
        load_document(path)
    assert info.value.code == code
    assert info.value.message


def test_size_limit_is_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("word " * 1000)
    with pytest.raises(IngestError) as info:
        load_document(path, max_bytes=100)
    assert info.value.code == "too_large" and "limit" in info.value.message
