"""The groundedness output rail: is every claim in the answer supported by the retrieved chunks?

Each answer sentence that makes a claim (citation markers, greetings, very short sentences and the
"I don't know" text are ignored) is checked in two cheap steps. First lexically: a sentence whose
content words are nearly all in the retrieved text (`LEXICAL_COVERAGE`), every number included, is
supported — RAG answers mostly restate their sources, and this costs microseconds where a MiniLM pass
costs milliseconds. The rest are embedded (one batch) and compared with the chunks' stored embeddings
(no re-embedding: the retriever keeps them): supported when the best cosine reaches `threshold`.
The score is the supported fraction. Embedding similarity catches
off-topic inventions, not a wrong number in an on-topic sentence: every sentence's facts (amounts, numbers,
times, phone numbers, named policies: app/rag/facts.py) must also be found in the sources, the customer's
question or the trusted texts (the configured contact line), else the sentence is unsupported whatever its
similarity, and no judge can overrule that. An optional LLM judge is consulted only when the embedding check
alone fails (`acheck_groundedness`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.guard.base import RailResult
from app.llm.base import ChatBackend, GenerationOptions
from app.rag.base import Chunk, Embedder
from app.rag.chain import DEFAULT_IDK, strip_citations
from app.rag.chunking import search_text
from app.rag.facts import LIST_MARKER, known_facts, lookup_text, unsupported_facts

log = logging.getLogger(__name__)

RAIL_NAME = "groundedness"
DEFAULT_THRESHOLD = 0.35
MIN_WORDS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n+")
_SMALL_TALK = re.compile(
    r"^(hi|hello|hey|thanks|thank you|you're welcome|sure|of course|certainly|great question|i hope this helps|"
    r"hope this helps|let me know|feel free|is there anything else|happy to help|glad to help|good (morning|"
    r"afternoon|evening))\b",
    re.IGNORECASE,
)
# A sentence opening with a pronoun ("They must be sent before 4 pm") means little alone; it is
# re-scored together with the sentence before it. Only such sentences get that context, so an invented
# claim cannot hide behind a well-supported neighbour.
_ANAPHORIC = re.compile(r"^(it|its|they|them|their|this|that|these|those|he|she|his|her|there|such)\b", re.IGNORECASE)
_IDK = re.compile(r"\bI (?:don't|do not) know\b|couldn't find that|could not find that", re.IGNORECASE)

LEXICAL_COVERAGE = 0.8  # share of a sentence's content words found in the sources to call it supported
_TOKEN = re.compile(r"[a-z0-9]+(?:[.,:][0-9]+)*")
_STOPWORD_TEXT = (
    "a an the and or but if then so of to in on at by for from with within into onto over under "
    "is are was were be been being am do does did done have has had having can could may might must shall "
    "should will would you your yours we our us i me my it its they them their this that these those there "
    "here as than too very also just only any all each every some such what which who whom whose "
    "when where why how about after before up down out off again further once more most other own same"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Numbers and negations must be in the sources verbatim: "$45" for "$25", or "can't" for "can", must
# never pass by wording ("can't" tokenises to "can" + "t").
_NEGATIONS = frozenset({"not", "no", "never", "cannot", "t", "nor", "none", "without"})


def _content_tokens(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS}


def lexically_supported(sentence: str, source_tokens: set[str]) -> bool:
    """True when nearly every content word of `sentence` (and every number, exactly) is in the sources."""
    tokens = _content_tokens(sentence)
    if len(tokens) < 3:
        return False
    if any((t in _NEGATIONS or any(ch.isdigit() for ch in t)) and t not in source_tokens for t in tokens):
        return False
    return len(tokens & source_tokens) / len(tokens) >= LEXICAL_COVERAGE


def supporting_sources(answer: str, chunks: list[Chunk], idk_text: str = DEFAULT_IDK) -> list[int]:
    """The 1-based numbers of the sources that each support a claim sentence of `answer` on their own, by wording
    (every number verbatim): how an answer that cites nothing gets its citations attributed, never guessed. A
    sentence several sources support credits the one sharing most of its words."""
    sentences = claim_sentences(answer, idk_text)
    if not sentences or not chunks:
        return []
    per_source = [_content_tokens(f"{c.title} {c.content}") for c in chunks]
    found: set[int] = set()
    for sentence in sentences:
        tokens = _content_tokens(sentence)
        best = max(range(len(chunks)), key=lambda i: len(tokens & per_source[i]))
        if lexically_supported(sentence, per_source[best]):
            found.add(best + 1)
    return sorted(found)


# (unsupported sentences, chunks) -> True when the judge finds them supported after all.
GroundednessJudge = Callable[[list[str], list[Chunk]], Awaitable[bool]]


def claim_sentences(answer: str, idk_text: str = DEFAULT_IDK) -> list[str]:
    """The sentences of `answer` worth checking."""
    text = strip_citations(answer).replace(idk_text, " ")
    sentences = []
    for raw in _SENTENCE_END.split(text):
        sentence = LIST_MARKER.sub("", raw).strip(" \t*_#>")
        if len(re.findall(r"\w+", sentence)) < MIN_WORDS or _SMALL_TALK.match(sentence) or _IDK.search(sentence):
            continue
        sentences.append(sentence)
    return sentences


@dataclass
class _WordingPass:
    """The cheap first step: the claims, which of them the sources do not support by wording, and the sentences
    stating facts that nothing known holds (sentence -> the facts)."""

    sentences: list[str]
    to_embed: list[int]
    facts: dict[str, list[str]]


def fact_sentences(answer: str, idk_text: str = DEFAULT_IDK) -> list[str]:
    """Every sentence but the "I don't know" ones, short ones included: "It costs $99." states a fee."""
    text = strip_citations(answer).replace(idk_text, " ")
    sentences = (LIST_MARKER.sub("", raw).strip(" \t*_#>") for raw in _SENTENCE_END.split(text))
    return [s for s in sentences if s and not _IDK.search(s)]


def _unsupported_facts(answer: str, chunks: list[Chunk], idk_text: str, known: tuple[str, ...]) -> dict[str, list[str]]:
    sentences = fact_sentences(answer, idk_text)
    if not sentences:
        return {}
    texts = [*(f"{c.title}\n{c.content}" for c in chunks), *known, idk_text]
    facts = known_facts(texts)
    known_text = lookup_text(texts)
    source_text = lookup_text([*texts[: len(chunks)], idk_text])
    found = {s: unsupported_facts(s, facts, known_text, source_text) for s in sentences}
    return {s: missing for s, missing in found.items() if missing}


def _wording_pass(answer: str, chunks: list[Chunk], idk_text: str, known: tuple[str, ...] = ()) -> _WordingPass:
    sentences = claim_sentences(answer, idk_text)
    facts = _unsupported_facts(answer, chunks, idk_text, known)
    if not sentences or not chunks:
        return _WordingPass(sentences, list(range(len(sentences))), facts)
    source_tokens = set().union(*(_content_tokens(f"{c.title} {c.content}") for c in chunks))
    return _WordingPass(
        sentences,
        [i for i, sentence in enumerate(sentences) if not lexically_supported(sentence, source_tokens)],
        facts,
    )


def check_groundedness(
    answer: str,
    chunks: list[Chunk],
    embedder: Embedder,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    action: Literal["flag", "block"] = "flag",
    chunk_embeddings: np.ndarray | None = None,
    idk_text: str = DEFAULT_IDK,
    wording: _WordingPass | None = None,
    facts_action: Literal["flag", "block"] | None = None,
) -> RailResult:
    """`chunk_embeddings` (rows aligned with `chunks`, e.g. `HybridRetriever.embeddings_for(chunks)`)
    avoids re-embedding; without it the chunks are embedded here. `action` applies to low similarity,
    `facts_action` (default: `action`) to a sentence stating a fact nothing known holds."""
    started = time.perf_counter()
    wording = wording or _wording_pass(answer, chunks, idk_text)
    if wording.facts:  # a figure or name nothing known holds: unsupported, whatever the similarity
        listed = "; ".join(f"{s[:80]!r} ({', '.join(f[:40] for f in missing[:4])})" for s, missing in
                           list(wording.facts.items())[:3])
        return RailResult(RAIL_NAME, facts_action or action, score=0.0, latency_ms=_ms(started),
                          detail=f"unsupported facts: {listed}")
    sentences = wording.sentences
    if not sentences:
        return RailResult(RAIL_NAME, "allow", score=1.0, latency_ms=_ms(started), detail="no claims to check")
    if not chunks:
        return RailResult(
            RAIL_NAME,
            action,
            score=0.0,
            latency_ms=_ms(started),
            detail=f"{len(sentences)} claim(s) and no retrieved sources",
        )
    best = np.ones(len(sentences), dtype=np.float32)  # lexically supported sentences count as 1.0
    to_embed = wording.to_embed
    if to_embed:
        if chunk_embeddings is None or len(chunk_embeddings) != len(chunks):
            chunk_embeddings = embedder.embed([search_text(c.to_dict()) for c in chunks])
        chunk_matrix = np.asarray(chunk_embeddings, dtype=np.float32).T
        best[to_embed] = (np.asarray(embedder.embed([sentences[i] for i in to_embed])) @ chunk_matrix).max(axis=1)
        retry = [i for i in to_embed if i > 0 and best[i] < threshold and _ANAPHORIC.match(sentences[i])]
        if retry:
            windows = embedder.embed([f"{sentences[i - 1]} {sentences[i]}" for i in retry])
            best[retry] = np.maximum(best[retry], (np.asarray(windows) @ chunk_matrix).max(axis=1))
    unsupported = [(s, float(b)) for s, b in zip(sentences, best, strict=True) if b < threshold]
    score = 1.0 - len(unsupported) / len(sentences)
    if not unsupported:
        lexical = len(sentences) - len(to_embed)
        how = f"{lexical} by wording" + (f", min similarity {float(best.min()):.2f}" if to_embed else "")
        return RailResult(
            RAIL_NAME,
            "allow",
            score=score,
            latency_ms=_ms(started),
            detail=f"{len(sentences)} claim(s) supported ({how})",
        )
    listed = "; ".join(f"{s[:80]!r} ({b:.2f})" for s, b in unsupported[:3])
    return RailResult(
        RAIL_NAME,
        action,
        score=score,
        latency_ms=_ms(started),
        detail=f"{len(unsupported)}/{len(sentences)} unsupported: {listed}",
    )


async def acheck_groundedness(
    answer: str,
    chunks: list[Chunk],
    embedder: Embedder,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    action: Literal["flag", "block"] = "flag",
    chunk_embeddings: np.ndarray | None = None,
    judge: GroundednessJudge | None = None,
    idk_text: str = DEFAULT_IDK,
    known: tuple[str, ...] = (),
    facts_action: Literal["flag", "block"] | None = None,
) -> RailResult:
    """The embedding check off the event loop (inline when the wording alone decides: no thread hop), then
    the judge only when the similarity failed (never for an unsupported fact). `known`: texts besides the
    sources whose facts an answer may state (the customer's question, the configured contact line)."""
    started = time.perf_counter()
    wording = _wording_pass(answer, chunks, idk_text, known)

    def embedding_check() -> RailResult:
        return check_groundedness(
            answer,
            chunks,
            embedder,
            threshold=threshold,
            action=action,
            chunk_embeddings=chunk_embeddings,
            idk_text=idk_text,
            wording=wording,
            facts_action=facts_action,
        )

    threaded = wording.to_embed and chunks and not wording.facts
    result = await asyncio.to_thread(embedding_check) if threaded else embedding_check()
    if result.verdict == "allow" or judge is None or not chunks or wording.facts:
        return result
    try:
        supported = await judge(wording.sentences, chunks)
    except Exception as exc:  # the embedding verdict stands when the judge cannot run
        result.detail = f"{result.detail}; judge_error: {type(exc).__name__}"
        result.latency_ms = _ms(started)
        return result
    result.latency_ms = _ms(started)
    if supported:
        result.verdict = "allow"
        result.detail = f"judge: supported (embedding check: {result.detail})"
    else:
        result.detail = f"judge: unsupported; {result.detail}"
    return result


JUDGE_PROMPT = (
    "You check answers of a bank's support assistant. Reply with exactly one word: YES if every claim "
    "is supported by the context, NO otherwise."
)


def make_llm_judge(llm: ChatBackend, *, max_context_chars: int = 4000) -> GroundednessJudge:
    async def judge(sentences: list[str], chunks: list[Chunk]) -> bool:
        context = "\n\n".join(c.content for c in chunks)[:max_context_chars]
        claims = "\n".join(f"- {s}" for s in sentences)
        messages = [
            {"role": "system", "content": JUDGE_PROMPT},
            {"role": "user", "content": f"Context:\n{context}\n\nClaims:\n{claims}\n\nSupported?"},
        ]
        completion = await llm.complete(messages, GenerationOptions(max_tokens=3, temperature=0.0))
        return completion.text.strip().lower().startswith("yes")

    return judge


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


class CachedGroundingCheck:
    """The groundedness output rail as the guard calls it: `(answer, context_texts) -> RailResult`.

    It flags (never blocks) by default: a cheap wording/embedding test, no extra LLM call. Context vectors are
    cached by text and primed by the pipeline with the vectors the index already stores, so retrieved
    text is not embedded again for each output window."""

    def __init__(self, embedder: Embedder, *, threshold: float = DEFAULT_THRESHOLD, max_cached: int = 4096) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.max_cached = max_cached
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def prime(self, texts: list[str], vectors: np.ndarray | None) -> None:
        if vectors is None or len(vectors) != len(texts):
            return
        for text, vec in zip(texts, vectors, strict=True):
            self._cache[text] = np.asarray(vec, dtype=np.float32)
            self._cache.move_to_end(text)
        self._trim()

    def _trim(self) -> None:
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    def _cached(self, texts: list[str]) -> np.ndarray | None:
        """The vectors when every text is cached (the pipeline primed them), else None."""
        if not texts or any(t not in self._cache for t in texts):
            return None
        return np.stack([self._cache[t] for t in texts])

    def vectors_for(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, vec in zip(missing, self.embedder.embed(missing), strict=True):
                self._cache[text] = vec
            self._trim()
        return np.stack([self._cache[t] for t in texts])

    async def __call__(
        self,
        answer: str,
        context: list[str],
        *,
        threshold: float | None = None,
        action: Literal["flag", "block"] = "flag",
        judge: GroundednessJudge | None = None,
        question: str = "",
        trusted: tuple[str, ...] = (),
        idk_text: str = DEFAULT_IDK,
        facts_action: Literal["flag", "block"] | None = None,
    ) -> RailResult:
        """`threshold`, `action`, `judge`, `trusted` (texts whose facts an answer may state: the configured
        "I don't know" text and its contact line) and `idk_text` come from the rails config (RailsGuard binds
        them); `question` is the turn's user message, whose own figures an answer may repeat."""
        chunks = [Chunk(id=str(i), document_id="", source="", title="", content=t) for i, t in enumerate(context)]
        vectors = self._cached(context)
        if vectors is None and context:
            vectors = await asyncio.to_thread(self.vectors_for, context)
        return await acheck_groundedness(
            answer,
            chunks,
            self.embedder,
            threshold=self.threshold if threshold is None else threshold,
            action=action,
            chunk_embeddings=vectors,
            judge=judge,
            idk_text=idk_text,
            known=(question, *trusted),
            facts_action=facts_action,
        )
