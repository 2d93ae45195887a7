"""The facts of an answer sentence that must come from the sources: amounts, numbers, times, limits, named policies.

Embedding similarity cannot tell "$45" from "$25" in an otherwise on-topic sentence, and wording coverage misses a
figure written another way. Here each fact is normalised ("$45", "45 dollars" and "USD 45" are money 45; "1–5" and
"1 to 5" are the numbers 1 and 5; "4 pm" and "4:00 p.m." are the time 16:00; "sixty days" is 60) and looked up
among the facts of the retrieved sources, the customer's question (an answer may repeat the customer's own
"$3,000") and trusted texts (the configured contact line). `unsupported_facts` lists what is not found: the
groundedness rail treats such a sentence as unsupported whatever its similarity (app/rag/grounding.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_WORD_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30, "forty": 40, "forty-five": 45,
    "fifty": 50, "sixty": 60, "ninety": 90, "hundred": 100,
}
# A number word counts as a fact in an answer only before one of these ("two business days", not "one of them").
_COUNT_UNITS = (
    r"(?:business |calendar |banking )?(?:days?|weeks?|months?|years?|hours?|minutes?|times?|withdrawals?|"
    r"transactions?|transfers?|deposits?|statements?|cycles?|percent)"
)
_PHONE = re.compile(r"\b(?:1[-. ])?\(?\d{3}\)?[-. ]\d{3}[-. ]\d{4}\b")
_TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*([ap])\.?\s?m\b\.?|\b(noon|midnight)\b", re.IGNORECASE)
_MONEY = re.compile(
    r"(?:\$|\bUSD\s?)\s?(\d[\d,]*(?:\.\d+)?)(\s?[kKmM]\b)?|\b(\d[\d,]*(?:\.\d+)?)\s?(?:dollars|USD)\b", re.IGNORECASE
)
_PERCENT = re.compile(r"\b(\d+(?:\.\d+)?)\s?(?:%|percent\b)", re.IGNORECASE)
# A list's markers ("- ", "1. Tap Cards", "2) Choose the card") at the start of a line: an answer's steps, not counts.
# Also at the very end of the text: a hold-back window can end right after one ("…for the Larkspur Bank app:\n\n1."),
# and a step number was then an unsupported "1" that replaced a correct answer with "I don't know". The groundedness
# rail strips them from its claim sentences with this same pattern (app/rag/grounding.py).
LIST_MARKER = re.compile(r"^[ \t]*(?:[-*•]|\d{1,2}[.)])(?=\s|$)", re.MULTILINE)
_NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(?:st|nd|rd|th)?\b")
_WORD_NUMBER = re.compile(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b(?=\s+" + _COUNT_UNITS + r"\b)", re.IGNORECASE)
_ANY_WORD_NUMBER = re.compile(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b", re.IGNORECASE)
# A named policy or product: two or more capitalised words, one of them a policy-like noun ("Zero Liability
# Guarantee", "Voyager Card", "Overdraft Protection"). Names in the sources are matched case-insensitively.
_POLICY_NOUNS = frozenset({
    "policy", "guarantee", "protection", "program", "programme", "plan", "promise", "rewards", "pay", "account",
    "checking", "savings", "card", "waiver", "coverage", "liability", "service", "services", "club", "plus",
    "advantage", "benefit", "benefits", "shield",
})
_NAME = re.compile(r"\b[A-Z][\w'’-]*(?:\s+(?:of\s+)?[A-Z][\w'’-]*)+")
# A screen, menu or button an answer tells the customer to use, quoted or in bold after a verb of navigation
# ('Navigate to the "Stocks" section', "Tap **Cards > Travel plans**"): an app feature the sources must name. Measured
# on dev: a small model answered "how do i buy stocks in the larkspur app" (the app has no trading) with invented steps.
_UI_LABEL = re.compile(
    r"\b(?:tap|press|click|select|choose|open|go to|navigate to|head to|under)\s+(?:on\s+)?(?:the\s+)?"
    r"(?:\*\*|[\"“])([^\"”*\n]{2,40})(?:\*\*|[\"”])",
    re.IGNORECASE,
)
_NAME_LEAD = frozenset({"the", "our", "your", "a", "an", "with", "larkspur", "bank", "and", "for", "if", "when"})


@dataclass
class Facts:
    money: set[float] = field(default_factory=set)
    percent: set[float] = field(default_factory=set)
    times: set[str] = field(default_factory=set)
    numbers: set[float] = field(default_factory=set)  # every numeric value, whatever its kind
    phones: set[str] = field(default_factory=set)
    names: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # screens and buttons (see _UI_LABEL): the sources must name them

    def merge(self, other: Facts) -> None:
        self.money |= other.money
        self.percent |= other.percent
        self.times |= other.times
        self.numbers |= other.numbers
        self.phones |= other.phones
        self.names += other.names
        self.labels += other.labels


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def _time(hour: str | None, minute: str | None, half: str | None, word: str | None) -> str:
    if word:
        return "12:00" if word.lower() == "noon" else "00:00"
    h = int(hour or 0) % 12 + (12 if (half or "").lower() == "p" else 0)
    return f"{h:02d}:{minute or '00'}"


def extract(text: str, *, source: bool = False) -> Facts:
    """The facts stated in `text`. `source=True` reads number words everywhere (a lenient lookup table);
    an answer's number words count only before a unit."""
    facts = Facts()
    text = LIST_MARKER.sub(" ", text)
    for m in _PHONE.finditer(text):
        facts.phones.add(re.sub(r"\D", "", m.group(0))[-10:])
    text = _PHONE.sub(" ", text)
    for m in _TIME.finditer(text):
        facts.times.add(_time(m.group(1), m.group(2), m.group(3), m.group(4)))
    rest = _TIME.sub(" ", text)
    for m in _MONEY.finditer(rest):
        value = _value(m.group(1) or m.group(3))
        scale = (m.group(2) or "").strip().lower()
        value *= 1000 if scale == "k" else 1_000_000 if scale == "m" else 1
        facts.money.add(value)
        facts.numbers.add(value)
    for m in _PERCENT.finditer(rest):
        facts.percent.add(_value(m.group(1)))
    for m in _NUMBER.finditer(rest):
        facts.numbers.add(_value(m.group(1)))
    for m in (_ANY_WORD_NUMBER if source else _WORD_NUMBER).finditer(rest):
        facts.numbers.add(float(_WORD_NUMBERS[m.group(1).lower()]))
    for m in _NAME.finditer(text):
        words = m.group(0).split()
        while words and words[0].lower() in _NAME_LEAD:
            words = words[1:]
        if len(words) >= 2 and any(w.lower().strip("'’") in _POLICY_NOUNS for w in words):
            facts.names.append(" ".join(words))
    facts.labels += [m.group(1).strip() for m in _UI_LABEL.finditer(text) if re.search(r"[A-Za-z]", m.group(1))]
    if source:
        # Whatever the source calls a thing, any of its times also count as the hours they name ("4 pm" = 4).
        facts.numbers |= {float(int(t[:2]) % 12 or 12) for t in facts.times}
    return facts


def known_facts(texts: Iterable[str]) -> Facts:
    """The facts of texts an answer may state facts from (sources, the question, the contact line), read as sources."""
    facts = Facts()
    for text in texts:
        facts.merge(extract(text, source=True))
    return facts


def lookup_text(texts: Iterable[str]) -> str:
    """`texts` joined, lower-cased, apostrophes straightened: what names and labels are looked up in."""
    return "\n".join(texts).lower().replace("\u2019", "'")


def unsupported_facts(sentence: str, known: Facts, known_text: str, source_text: str | None = None) -> list[str]:
    """The facts of `sentence` that `known` (from `extract(..., source=True)` of the sources, question and trusted
    texts) does not hold; `known_text` is the same text lower-cased, for names. Screens and buttons must be in
    `source_text` (the sources alone, lower-cased) when given: the customer's "how do i buy stocks in the app" names
    no "Stocks" screen."""
    claimed = extract(sentence)
    missing = [f"${v:g}" for v in sorted(claimed.money) if v not in known.money and v not in known.numbers]
    missing += [f"{v:g}%" for v in sorted(claimed.percent) if v not in known.percent]
    missing += [t for t in sorted(claimed.times) if t not in known.times]
    missing += [p for p in sorted(claimed.phones) if p not in known.phones]
    counted = claimed.money | claimed.percent
    missing += [f"{v:g}" for v in sorted(claimed.numbers - counted) if v not in known.numbers]
    missing += [n for n in claimed.names if not _name_known(n, known_text)]
    missing += [n for n in claimed.labels if not _name_known(n, known_text if source_text is None else source_text)]
    return missing


def _name_known(name: str, known_text: str) -> bool:
    words = name.lower().replace("’", "'").split()
    # "Premier Checking" for "Larkspur Premier Checking"; a possessive or plural ("Voyager card's") still matches.
    words[-1] = re.sub(r"(?:'s|s)$", "", words[-1])
    return bool(re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)), known_text))
