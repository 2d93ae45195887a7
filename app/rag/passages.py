"""Context that fits the question (issue 18, item 1): the passages of the retrieved chunks that answer it.

On a CPU the embedded LLM reads ~17-60 prompt tokens/s, so every sentence in the prompt costs time to first
token. Three whole chunks (~700 tokens) mostly hold text the question does not ask about. Here each chunk is cut
into units that are never split further (a sentence, a list item, a table row) and each unit is scored with what
retrieval already has, no model pass:

    lexical   idf-weighted share of the question's BM25 terms (app/rag/bm25.py tokenizer: stemmed, no function
              words) found in the unit; the chunk's title and section count a little ("the fee" under "Wires")
    figure    a question that asks for an amount, a time or a count ("how much", "how long", "limit") favours
              units that hold one, since the answer's number is what the model must see
    rank      a small prior for the chunk's retrieval rank (its dense cosine and BM25 rank already fused)

Units are taken best first until an adaptive budget is spent: a short, well-matched factual question gets a
small one; a long question, a "how do I" question or one whose words the chunks barely share (a paraphrase:
the lexical score cannot be trusted) gets more. A kept unit brings what it needs to be read alone: a table
row its header row, a list item the line that introduces the list, a sentence starting with "It"/"This" the
sentence before it, and, when the question wants a figure the unit lacks, the nearest neighbour holding one.
Within a source the units keep their order; "…" marks omitted text. Sources keep their retrieval order and
are numbered from 1 among those that contribute, so citations map to the right chunk (`fit_passages` returns
them). A sentence repeated by an overlapping neighbour chunk is given once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from app.rag.base import Chunk
from app.rag.bm25 import STOPWORDS, tokenize

# Budget (approximate tokens of the sources block) for the smallest question, and what each extra question
# term, a procedural question and a weak lexical match add. Chosen on tests/data/rag_tasks*.jsonl with
# bench/context_budget.py (answer-in-context rate against prompt size); docs/benchmarks.md has the numbers.
MIN_TOKENS = 120
TOKENS_PER_TERM = 15
PROCEDURAL_TOKENS = 100
WEAK_MATCH = 0.5  # best unit covers less than half the question's idf mass: a paraphrase, trust lexical less
WEAK_MATCH_TOKENS = 120
KEEP_RATIO = 0.3  # a unit scoring under this share of the best one is not relevant enough to add
FIGURE_BONUS = 0.25  # a unit holding the kind of figure the question asks for
HEADING_SHARE = 0.3  # of the chunk's title/section coverage every unit of it gets
RANK_PRIOR = 0.1  # / retrieval rank
DENSE_PRIOR = 0.0  # x the chunk's dense cosine
NEIGHBOUR_SHARE = 0.3  # of the best same-block neighbour's score a unit gets (see fit_passages)
HISTORY_WEIGHT = 0.4  # terms of the previous user message: a follow-up's subject ("…and how long does it take?")

# A sentence ends at . ! or ? before a capital, digit or quote, but not after an abbreviation ("4 p.m. ET"):
# joining two sentences costs a few tokens, cutting one loses its meaning.
_ABBREVIATIONS = "".join(
    rf"(?<!\b{re.escape(a)})" for a in ("a.m.", "p.m.", "e.g.", "i.e.", "U.S.", "No.", "Mr.", "Ms.", "Dr.", "St.")
)
_SENTENCE_END = re.compile(rf"(?<=[.!?]){_ABBREVIATIONS}\s+(?=[A-Z0-9\"'(\[$])")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?[\s:|-]+\|[\s:|-]*$")
_FIGURE = re.compile(r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|twelve|thirty|sixty|ninety)\b", re.I)
_AMOUNT = re.compile(r"[$€£%]|\d\s*(?:percent|dollars?)\b|\bfree\b|\bno fee\b", re.I)
_TIME = re.compile(
    r"\b(?:\d+|one|two|three|four|five|six|seven|ten|thirty|sixty|ninety)[\s–-]*(?:to\s+\d+\s+)?"
    r"(?:business\s+|calendar\s+)?(?:days?|hours?|minutes?|weeks?|months?|years?)\b"
    r"|\b\d{1,2}(?::\d\d)?\s*(?:a\.?m\.?|p\.?m\.?)|\b(?:same|next|following) (?:business )?day\b"
    r"|\bimmediately\b|\binstantly\b",
    re.I,
)
_WANTS_AMOUNT = re.compile(
    r"\b(?:how much|cost|costs|fee|fees|charge|charged|price|limit|limits|max|maximum|min|minimum|most|least|"
    r"rate|apy|apr|interest|pay|owe|balance|deposit)\b",
    re.I,
)
_WANTS_TIME = re.compile(
    r"\b(?:how long|when|how soon|how fast|how quickly|deadline|cutoff|cut-off|time|days?|hours?|until|by what)\b",
    re.I,
)
_WANTS_COUNT = re.compile(r"\b(?:how many|how old|number of)\b", re.I)
_PROCEDURAL = re.compile(r"\b(?:how (?:do|can|should|would) (?:i|we|you)|steps?|explain|what happens|why)\b", re.I)
# A sentence that leans on the one before it ("It…", "…by the same date"): kept with that sentence.
_BACK_REFERENCE = re.compile(
    r"^(?:it|this|that|these|those|they|there|then|otherwise|also|if so)\b|\bthe same\b|\bas above\b", re.I
)


@dataclass
class Unit:
    """One piece of a chunk that is never cut: a sentence, a list item or a table row."""

    text: str
    line: int  # line of the chunk it is on (units of one line are rejoined with a space)
    block: int  # paragraph, list or table it belongs to
    header: int | None = None  # index of the unit that must come with it (table header, list intro)
    terms: frozenset[str] = field(default_factory=frozenset)


def split_units(content: str) -> list[Unit]:
    """The chunk's units in order. A table's separator row is dropped (no information, a dozen tokens)."""
    units: list[Unit] = []
    block = 0
    header: int | None = None  # the current table's header row or list's intro line
    previous_kind = ""
    for line_no, raw in enumerate(content.splitlines()):
        line = raw.strip()
        kind = "table" if line.startswith("|") else "list" if _LIST_ITEM.match(line) else "text" if line else ""
        if kind != previous_kind or kind == "text" or not line:
            block += 1
            if kind == "list" and previous_kind == "text" and units and units[-1].text.endswith(":"):
                block -= 1  # "You can avoid the fee by:" belongs to its list
                header = len(units) - 1
            elif kind == "table":
                header = len(units)  # the first row of a table is its header
            elif kind != "list":
                header = None
        previous_kind = kind
        if not line or _TABLE_SEPARATOR.match(line):
            continue
        pieces = [line] if kind == "table" else [p for p in _SENTENCE_END.split(line) if p.strip()]
        for piece in pieces:
            own_header = header if header is not None and header != len(units) else None
            units.append(Unit(piece.strip(), line_no, block, own_header, frozenset(tokenize(piece))))
    return units


@dataclass(frozen=True)
class QuestionProfile:
    """What the question asks, in terms the units can be scored against."""

    weights: dict[str, float]  # term -> weight (idf; history terms scaled down)
    total: float  # idf mass of the question's own terms
    wants: tuple[re.Pattern[str], ...]  # figure patterns the answer likely holds
    budget: int  # before the weak-match extra


def profile_question(
    question: str, previous: str, idf: Callable[[str], float], *, min_tokens: int, max_tokens: int
) -> QuestionProfile:
    own = set(tokenize(question))
    weights = {t: idf(t) for t in own}
    for term in set(tokenize(previous)) - own:
        weights[term] = HISTORY_WEIGHT * idf(term)
    wants: list[re.Pattern[str]] = []
    if _WANTS_AMOUNT.search(question):
        wants.append(_AMOUNT)
    if _WANTS_TIME.search(question):
        wants.append(_TIME)
    if _WANTS_COUNT.search(question):
        wants.append(_FIGURE)
    budget = min_tokens + TOKENS_PER_TERM * max(0, len(own) - 2)
    if _PROCEDURAL.search(question):
        budget += PROCEDURAL_TOKENS
    total = sum(weights[t] for t in own)
    return QuestionProfile(weights, total, tuple(wants), min(budget, max_tokens))


def _coverage(terms: frozenset[str], profile: QuestionProfile) -> float:
    if profile.total <= 0:
        return 0.0
    return min(1.0, sum(w for t, w in profile.weights.items() if t in terms) / profile.total)


def _holds_wanted(unit: Unit, profile: QuestionProfile) -> bool:
    return any(p.search(unit.text) for p in profile.wants)


def _score(unit: Unit, heading_cover: float, prior: float, profile: QuestionProfile) -> float:
    figure = FIGURE_BONUS if _holds_wanted(unit, profile) else 0.0
    return _coverage(unit.terms, profile) + HEADING_SHARE * heading_cover + figure + prior


def approx_tokens(text: str) -> int:
    """Same estimate as app/rag/chain.approx_tokens (kept here to avoid an import cycle)."""
    return math.ceil(len(text.split()) * 1.3)


def _companions(units: list[Unit], i: int, profile: QuestionProfile) -> list[int]:
    """What unit i needs to be read alone (see the module docstring)."""
    unit = units[i]
    extra: list[int] = []
    if unit.header is not None:
        extra.append(unit.header)
    if i > 0 and units[i - 1].block == unit.block and _BACK_REFERENCE.search(unit.text):
        extra.append(i - 1)
    if profile.wants and not _holds_wanted(unit, profile):
        for j in (i + 1, i - 1, i + 2):
            if 0 <= j < len(units) and units[j].block == unit.block and _holds_wanted(units[j], profile):
                extra.append(j)
                break
    return extra


@dataclass
class Passages:
    """What `fit_passages` kept: the contributing chunks in retrieval order and each one's excerpt."""

    chunks: list[Chunk]
    texts: list[str]
    tokens: int  # approximate tokens of the excerpts and their headings
    budget: int


def _render(units: list[Unit], kept: set[int]) -> str:
    out: list[str] = []
    last: int | None = None
    for i in sorted(kept):
        if last is not None:
            if i != last + 1:
                out.append(" … " if units[i].line == units[last].line else "\n…\n")
            else:
                out.append(" " if units[i].line == units[last].line else "\n")
        out.append(units[i].text)
        last = i
    return "".join(out)


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def fit_passages(
    chunks: list[Chunk],
    question: str,
    *,
    heading: Callable[[int, Chunk], str],
    previous: str = "",
    idf: Callable[[str], float] | None = None,
    min_tokens: int = MIN_TOKENS,
    max_tokens: int = 900,
) -> Passages:
    """The best units of `chunks` for `question` within the adaptive budget (see the module docstring).
    `heading(n, chunk)` is the source line the prompt shows; its cost counts against the budget. `idf` weighs
    the question's terms (the index's BM25 statistics); without it every term weighs 1. `previous` is the
    previous user message, whose terms count a little (a follow-up's subject)."""
    weigh = idf or (lambda _term: 1.0)
    profile = profile_question(question, previous, weigh, min_tokens=min_tokens, max_tokens=max_tokens)
    parsed = [split_units(c.content) for c in chunks]
    scored: list[tuple[float, int, int]] = []
    best_cover = 0.0
    for ci, (chunk, units) in enumerate(zip(chunks, parsed, strict=True)):
        heading_cover = _coverage(frozenset(tokenize(f"{chunk.title} {chunk.section}")), profile)
        # The chunk's retrieval standing: its rank (dense and BM25 fused) and its dense cosine to the query.
        prior = RANK_PRIOR / (ci + 1) + DENSE_PRIOR * max(0.0, float(chunk.score))
        own = [_score(unit, heading_cover, prior, profile) for unit in units]
        for ui, unit in enumerate(units):
            best_cover = max(best_cover, _coverage(unit.terms, profile))
            # Passages, not lone sentences: a unit beside a strong one in its paragraph or list shares its credit.
            near = [own[j] for j in (ui - 1, ui + 1) if 0 <= j < len(units) and units[j].block == unit.block]
            scored.append((own[ui] + NEIGHBOUR_SHARE * max(near, default=0.0), ci, ui))
    if not scored:
        return Passages([], [], 0, profile.budget)
    scored.sort(key=lambda s: (-s[0], s[1], s[2]))
    budget = profile.budget + (WEAK_MATCH_TOKENS if best_cover < WEAK_MATCH else 0)
    budget = min(budget, max_tokens)
    kept: dict[int, set[int]] = {}
    seen: set[str] = set()
    used = 0
    for score, ci, ui in scored:
        if kept and score < KEEP_RATIO * scored[0][0]:
            break
        units = parsed[ci]
        if _key(units[ui].text) in seen:  # given already: an overlapping chunk's copy, or another unit's companion
            continue
        group = [ui] + [
            j
            for j in _companions(units, ui, profile)
            if j not in kept.get(ci, set()) and _key(units[j].text) not in seen
        ]
        cost = sum(approx_tokens(units[j].text) for j in group)
        if ci not in kept:
            cost += approx_tokens(heading(len(kept) + 1, chunks[ci]))
        if used + cost > budget and kept:
            continue  # a smaller unit further down may still fit
        kept.setdefault(ci, set()).update(group)
        seen.update(_key(units[j].text) for j in group)
        used += cost
    order = sorted(kept)
    return Passages([chunks[ci] for ci in order], [_render(parsed[ci], kept[ci]) for ci in order], used, budget)


@dataclass(frozen=True)
class Coverage:
    """How much of a question one text holds: `share` is the idf-weighted share of the question's terms (the same
    measure passage selection scores units with; the previous message's terms at HISTORY_WEIGHT), `terms` the
    question's own terms it holds."""

    share: float
    terms: frozenset[str]


# Words that are no subject: apostrophe-less contractions ("whats" stems to "what", which the index never holds), chat
# fillers (absent from the knowledge base, they would weigh the most in a question's idf mass) and the light words
# of a question ("how much", "can I get").
_CHAT_WORDS = """im ive id dont didnt doesnt cant wont isnt arent wasnt whats hows wheres thats theres youre yall u ur
rn pls plz please hey hi hello thanks thx ok okay gonna wanna gotta lol yeah guys guy much many get got need want
thing think know like really real one ones bunch lot lots bit stuff kinda sorta"""
CHAT_FILLER = frozenset(t for w in _CHAT_WORDS.split() for t in tokenize(w)) | STOPWORDS


def question_coverage(
    text: str, question: str, *, previous: str = "", idf: Callable[[str], float] | None = None
) -> Coverage:
    """The share of `question` (idf-weighted terms, chat fillers left out) that `text` holds, e.g. a passage the prompt
    gave the model. Only the question's own terms count ("and can you mail it to me in France?" asks about mail to
    France, whatever the previous message was about); `previous` stands in when the question has none ("and that
    one?")."""
    weigh = idf or (lambda _term: 1.0)
    own = frozenset(tokenize(question)) - CHAT_FILLER
    if not own:
        own = frozenset(tokenize(previous)) - CHAT_FILLER
    weights = {t: weigh(t) for t in own}
    profile = QuestionProfile(weights, sum(weights.values()), (), 0)
    terms = frozenset(tokenize(text))
    return Coverage(_coverage(terms, profile), own & terms)
