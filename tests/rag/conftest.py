"""Small temp corpora for the RAG tests (independent of the wording of knowledge/)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app.settings import Settings

CORPUS = {
    "cards.md": """# Card help

## Lock your card
You can lock your debit card instantly in the mobile app under Cards, then Lock card. Locking stops new
purchases and ATM withdrawals, but recurring payments you set up earlier keep working.

## Replacement cards
A replacement debit card arrives within 5 business days by standard mail. Expedited delivery in 2 business
days costs $15.
""",
    "savings.md": """# Savings accounts

## Saver Plus rates
The Saver Plus account earns 3.10% APY on balances of $1,000 or more. Interest is compounded daily and paid
monthly on the last business day.

## Withdrawals
You can make up to six free withdrawals from savings each statement cycle; after that each one costs $5.
""",
    "wires.md": """# Wire transfers

## Domestic wires
Outgoing domestic wire transfers cost $25 each and must be submitted before 4 pm Eastern to be sent the
same business day. Incoming wires are free.

## International wires
Outgoing international wires cost $45 and usually arrive within 1 to 3 business days.
""",
    "app-errors.txt": """Mobile app error messages.
If the app shows a sign-in error, check your internet connection and update the app to the newest version.
If the app shows a timeout error while depositing a check, wait a few minutes and try the deposit again.
Error code QX-7731 means the scanner could not read the routing number on your check; retake the photo on a
dark background.
""",
}


def write_corpus(directory: Path, files: dict[str, str] | None = None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (files or CORPUS).items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def make_settings(root: Path, **overrides: object) -> Settings:
    (root / "kb").mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {
        "data_dir": root / "data",
        "knowledge_dir": root / "kb",
        "rag_top_k": 4,
        "rag_score_threshold": 0.3,
        "rag_context_tokens": 1500,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def rag_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def corpus_writer() -> Callable[..., list[Path]]:
    return write_corpus


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF (Helvetica text, one line per page) with a correct xref table."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        content = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET"
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
        )
        objects.append(f"<< /Length {len(content)} >>\nstream\n{content}\nendstream")
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out
