"""Answer pages (issue 18, items 1 and 8): a document read once, then reused from the LLM's prompt cache.

On a CPU the embedded LLM reads ~17-70 prompt tokens/s, and every grounded answer used to pay for its sources
(~250-300 tokens of passages: 10-16 s on a 2-core AVX2 machine) because they change with every question. A page
is a fixed run of consecutive chunks of one document (a whole document when it is short, as the shipped ones
are), rendered the same way every time. A prompt that puts the page right after the fixed instructions:

    system:  <instructions> Sources: [1] <page chunk 1> ... [k] <page chunk k>   <- the same text on every turn
             ([k+1] passages of other documents, when configured)
    history, question

shares its whole head with every other question the page answers, so llama.cpp's prompt cache (its KV states,
kept in host memory: `cache_ram_mib`) has read it already and only the question is new: ~15-40 tokens instead
of ~300. The page is chosen by the top retrieved chunk; its chunks keep their document order and numbers, so
citations map to chunks as before. Reading a page the first time costs its whole length (~700-1,000 tokens), so
the pipeline uses the page only when it is warm (app/llm/page_warmer.py reads the pages in the background while
the server is idle) and the passages otherwise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from app.rag.base import Chunk
from app.rag.chain import approx_tokens, source_heading

MIN_OVERLAP_CHARS = 20  # a shorter shared edge between neighbour chunks is a coincidence, not the splitter's overlap
MAX_OVERLAP_CHARS = 600


@dataclass(frozen=True)
class Page:
    """Consecutive chunks of one document, numbered [1]..[k] in `text`; `key` names the text (a hash)."""

    document_id: str
    number: int  # 0-based page of its document
    chunks: tuple[Chunk, ...]
    blocks: tuple[str, ...]  # "[n] heading\ncontent" of each chunk
    text: str  # the blocks joined by blank lines, exactly as the prompt holds them
    tokens: int  # approximate tokens of `text`
    key: str


def chunk_from_record(record: dict[str, Any]) -> Chunk:
    """An index record (IndexSnapshot.chunks) as a Chunk, without retrieval scores."""
    return Chunk(
        id=str(record["id"]),
        document_id=str(record["document_id"]),
        source=str(record.get("source", "")),
        title=str(record.get("title", "")),
        content=str(record.get("content", "")),
        section=str(record.get("section") or ""),
        page=record.get("page"),
    )


def strip_overlap(previous: str, current: str) -> str:
    """`current` without the text it repeats from the end of `previous` (the splitter's chunk overlap)."""
    longest = min(len(previous), len(current), MAX_OVERLAP_CHARS)
    for size in range(longest, MIN_OVERLAP_CHARS - 1, -1):
        if previous.endswith(current[:size]):
            return current[size:].lstrip()
    return current


def render_blocks(chunks: list[Chunk], first_number: int = 1) -> tuple[list[str], list[str]]:
    """(blocks, contents): "[n] heading\\ncontent" for each chunk, numbered from `first_number`, with the overlap
    a chunk shares with its predecessor in the same section given once."""
    blocks: list[str] = []
    contents: list[str] = []
    for i, chunk in enumerate(chunks):
        content = chunk.content.strip()
        if i and chunks[i - 1].section == chunk.section:
            content = strip_overlap(chunks[i - 1].content.strip(), content) or content
        blocks.append(f"{source_heading(first_number + i, chunk)}\n{content}")
        contents.append(content)
    return blocks, contents


def _page(document_id: str, number: int, chunks: list[Chunk]) -> Page:
    blocks, _ = render_blocks(chunks)
    text = "\n\n".join(blocks)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Page(document_id, number, tuple(chunks), tuple(blocks), text, approx_tokens(text), key)


def paginate(chunks: list[Chunk], max_tokens: int) -> list[Page]:
    """One document's chunks (in document order) cut into pages of at most `max_tokens` (a chunk longer than
    that is a page alone); the boundaries depend on the chunks only, so a page's text never changes."""
    pages: list[Page] = []
    current: list[Chunk] = []
    used = 0
    for chunk in chunks:
        cost = approx_tokens(source_heading(len(current) + 1, chunk)) + approx_tokens(chunk.content)
        if current and used + cost > max_tokens:
            pages.append(_page(chunk.document_id, len(pages), current))
            current, used = [], 0
        current.append(chunk)
        used += cost
    if current:
        pages.append(_page(current[0].document_id, len(pages), current))
    return pages


class PageBook:
    """The pages of one index version: which page holds a chunk, and every page (for warming)."""

    def __init__(self, records: list[dict[str, Any]], max_tokens: int) -> None:
        by_document: dict[str, list[Chunk]] = {}
        for record in records:  # the index keeps each document's chunks in document order
            chunk = chunk_from_record(record)
            by_document.setdefault(chunk.document_id, []).append(chunk)
        self.pages: list[Page] = []
        self._page_of: dict[str, Page] = {}
        for chunks in by_document.values():
            for page in paginate(chunks, max_tokens):
                self.pages.append(page)
                for chunk in page.chunks:
                    self._page_of[chunk.id] = page

    def page_of(self, chunk: Chunk) -> Page | None:
        return self._page_of.get(chunk.id)

    def __len__(self) -> int:
        return len(self.pages)


def page_head(instructions: str) -> str:
    """What comes before a page's first source block in the system message (chain.PROMPT's layout)."""
    return f"{instructions}\n\nSources:\n\n"


def page_prefix(instructions: str, page: Page) -> str:
    """The system message's head that every question answered from `page` shares (what the prompt cache keeps)."""
    return page_head(instructions) + page.text
