"""The turn's side of answer pages (app/rag/pages.py): which page a question is answered from, whether the LLM's
prompt cache holds it yet (app/llm/page_warmer.py), and the warm-up plan at start."""

from __future__ import annotations

import hashlib
import logging
import weakref
from typing import TYPE_CHECKING

from app.guard.base import AssistantTexts
from app.llm.page_warmer import PageWarmer, WarmJob, warm_job
from app.rag.base import Chunk
from app.rag.chain import PreparedPrompt, build_page_messages, page_instructions
from app.rag.pages import Page, PageBook, page_head

if TYPE_CHECKING:
    from app.rag.index import IndexSnapshot
    from app.state import AppState

log = logging.getLogger("guardchat.rag")

# One page book per live index version (snapshots are not hashable; a reload builds a new one and the old
# book goes with it): (id, max_tokens) -> (a weak reference to the snapshot, its book).
_books: dict[tuple[int, int], tuple[weakref.ref[IndexSnapshot], PageBook]] = {}


def page_book(snapshot: IndexSnapshot, max_tokens: int) -> PageBook:
    key = (id(snapshot), max_tokens)
    held = _books.get(key)
    if held is not None and held[0]() is snapshot:
        return held[1]
    for stale in [k for k, (ref, _) in _books.items() if ref() is None]:
        del _books[stale]
    book = PageBook(snapshot.chunks, max_tokens)
    _books[key] = (weakref.ref(snapshot), book)
    return book


def page_key(texts: AssistantTexts, page: Page) -> str:
    """Names what the prompt cache must hold: the instructions (an admin may change them) and the page."""
    head = page_instructions(texts.system_prompt, texts.idk)
    return hashlib.sha256(f"{head}\0{page.key}".encode()).hexdigest()[:20]


def page_warm_job(texts: AssistantTexts, page: Page) -> WarmJob:
    head = page_head(page_instructions(texts.system_prompt, texts.idk))  # + the blocks = page_prefix(...)
    return warm_job(page_key(texts, page), head, list(page.blocks), page.tokens)


def page_prompt(
    state: AppState, question: str, history: list[dict[str, str]], sources: list[Chunk], texts: AssistantTexts
) -> PreparedPrompt | None:
    """The page prompt for the top retrieved chunk's page, or None (use the passages): nothing retrieved, or the
    embedded LLM has not read the page yet (it is then queued first, so the next question on it is fast)."""
    if not sources or state.retriever is None:
        return None
    settings = state.settings
    page = page_book(state.retriever.snapshot, settings.rag_context_tokens).page_of(sources[0])
    if page is None:
        return None
    warmer = state.page_warmer
    if warmer is not None and not warmer.is_warm(page_key(texts, page)):
        warmer.want(page_warm_job(texts, page), first=True)
        return None
    idf = state.retriever.snapshot.bm25.idf
    prepared = build_page_messages(
        question, history, page, sources, system_prompt=texts.system_prompt, idk_text=texts.idk,
        extra_tokens=settings.rag_page_extra_tokens, extra_margin=settings.rag_page_extra_margin,
        min_extra_tokens=settings.rag_context_min_tokens, idf=idf,
    )  # fmt: skip
    prepared.variables["context"] = f"page {page.document_id} #{page.number + 1}"
    return prepared


def plan_warmup(state: AppState, warmer: PageWarmer) -> int:
    """Queues every page of the live index (in index order) with the live rails' texts; returns how many."""
    if state.retriever is None:
        return 0
    texts = state.rails.current.guard.texts
    book = page_book(state.retriever.snapshot, state.settings.rag_context_tokens)
    for page in book.pages:
        warmer.want(page_warm_job(texts, page))
    log.info("answer pages: %d to read into the LLM's prompt cache while idle (~%d tokens)",
             len(book), sum(p.tokens for p in book.pages))  # fmt: skip
    return len(book)
