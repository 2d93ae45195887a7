"""A second look (issue 18, item 5): when the model answers the configured "I don't know" text although one of the
passages it was given covers the question well, it is asked once more, cheaply.

The small embedded model copies the prompt's 'reply exactly: "<I don't know text>"' line for questions its
sources answer (casual, indirect or alarming wording). Dropping that line made it answer what nothing answers, so
the line stays and the answer path gets a second chance instead:

    first answer   the request stops at the start of the text's second sentence (`Plan.stop`): once the model has
                   said "I don't know." nothing it copies after that is worth decoding. The stream is held while it
                   could still be the "I don't know" text (its first sentence, compared case- and apostrophe-blind),
                   so that text is never shown before the second look decides
    the gate       the best passage of the prompt holds at least `min_coverage` of the question's idf-weighted
                   terms (app/rag/passages.py `question_coverage`, the measure passage selection scores with)
    second look    the same messages (the backend reuses the whole prompt's KV cache: the prefix is identical, and
                   the first request ended normally, so llama.cpp kept it in its slot), then on llama.cpp the start
                   of an answer to continue (`LEAD`, "According to source [n],"), elsewhere the model's "I don't
                   know." and a short user turn naming the source and the question's words it holds (`FOLLOW_UP`)
    the vet        the second answer's first sentence is held until whole (`Plan.vet`): it ends as the "I don't
                   know" text when the model keeps to it, or repeats a rare word of the question that no passage
                   holds (an answer about what the sources do not say); otherwise it is what the customer sees,
                   through the same output rails (the groundedness facts rail blocks an invented figure)

The same echo test can guard first answers (`Plan.vet_first`, `rag_first_answer_vet`, off by default: measured not to
help on the test half): when the question's asking words include rare ones no passage holds, the first answer's
first sentence is held until whole, and one that names such a word ("Yes, you can mail a cashier's check to
France.") without stating a figure the passages hold becomes the "I don't know" text.

An "I don't know" that gets no second look (below the gate, or the second look's own answer) is shown as the
configured text in full. The trace's `second_look` says what was decided (`Plan.record`). This module needs no
model and no I/O; the streaming side is app/pipeline/generation.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from app.rag.facts import extract, known_facts, lookup_text, unsupported_facts
from app.rag.long_query import asking_clauses
from app.rag.passages import CHAT_FILLER, Coverage, question_coverage

# The gate: the best passage holds at least this share of the question's idf mass. Chosen on the dev split of
# tests/data/rag_conversations_dev.jsonl (docs/rag.md, "A second look").
MIN_COVERAGE = 0.3
MAX_TERMS = 4  # question words named in the follow-up
# The second request, on a backend that continues a final assistant message (llama.cpp: `prefill`): the answer is
# started for the model, so it reads on from the source instead of copying the "I don't know" line again.
LEAD = "According to source [{n}],"
# Elsewhere (`follow_up`): the model's "I don't know." and this user turn. It does not offer the "I don't know" text
# again: measured on the dev split, the 1.5B model copied an offered one every time (docs/rag.md, "A second look").
FOLLOW_UP = "Source [{n}] does talk about {terms}. Answer my question from it, citing it like [{n}]."
# A second look's answer that repeats a question word no passage holds, and that is this rare in the knowledge base
# (its BM25 idf at least this share of the idf of a word no chunk holds: on knowledge/, ~1 chunk in 20 or fewer), is
# about something the sources do not say: "the WiFi password at the Larkspur Plaza branch is 135550123".
ECHO_IDF_SHARE = 0.5
STOP_CHARS = 40  # of the "I don't know" text's second sentence: where its first request stops
# A second look whose first sentence takes at least this share of its words from the "I don't know" text is that text
# in other words: measured on dev, "According to source [1], you can reach Larkspur Bank support at 1-800-555-0142 or
# visit any branch to report the theft." (the text's contact line, 12 of its 16 words) answered an identity theft.
IDK_WORDS_SHARE = 0.7

IdkState = Literal["maybe", "idk", "no"]
_QUOTES = "\"'`*“‘ \n\t"
_DIGIT = re.compile(r"\d")
# Words before a noun phrase: an echo after one of them names a thing ("in France"), see `Plan.named_echoes`.
_NAMING_WORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "my", "your", "our", "their", "his", "her", "its", "some",
    "any", "no", "to", "in", "on", "at", "for", "of", "from", "with", "by", "about", "into", "via", "per",
})
_WORD = re.compile(r"[A-Za-z0-9$%][\w$%.'’-]*")


def _norm(text: str) -> str:
    lowered = text.replace("\u2019", "'").replace("\u2018", "'").lower().lstrip(_QUOTES)
    return " ".join(lowered.split())


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)


def idk_key(idk: str) -> str:
    """What an answer must start with to be the "I don't know" text: its first sentence, without the stop."""
    return _norm(_sentences(idk)[0]).rstrip(".!?")


def idk_state(text: str, key: str) -> IdkState:
    """`"idk"` once `text` starts with the key, `"maybe"` while it is still a prefix of it, else `"no"`."""
    norm = _norm(text)
    if norm.startswith(key):
        return "idk"
    if key.startswith(norm.rstrip()):
        return "maybe"
    return "no"


def question_words(question: str, terms: frozenset[str], limit: int = MAX_TERMS) -> list[str]:
    """The question's own words (as the customer wrote them) whose BM25 terms are in `terms`, in order."""
    from app.rag.bm25 import tokenize

    words: list[str] = []
    seen: set[str] = set()
    for raw in _WORD.findall(question):
        word = raw.strip(".'’-")
        stems = set(tokenize(word))
        key = word.lower()
        if stems & terms and key not in seen:
            seen.add(key)
            words.append(word)
    return words[:limit]


def _join(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


@dataclass
class Plan:
    """One turn's second look: what the gate needs, decided at most once, and the record for the trace."""

    idk: str
    question: str
    passages: list[str]  # source [n] is passages[n-1], as the prompt gave them
    previous: str = ""  # the previous user message (a follow-up's subject)
    idf: Callable[[str], float] | None = None
    min_coverage: float = MIN_COVERAGE
    prefill: bool = False  # the backend continues a final assistant message (see LEAD)
    vet_first_answers: bool = False  # `vets_first_answer` (settings: rag_first_answer_vet, off by default)
    record: dict[str, Any] = field(default_factory=dict)
    key: str = field(init=False, default="")
    # The clauses that ask, when others tell a story ("my wallet got stolen in a mugging, what's my liability for the
    # charges"): the gate also measures them alone, and the vet's echoes come from them only ("ex" in "my ex has my
    # card" is the customer's story, not a subject the answer invents).
    ask: str = field(init=False, default="")
    _best: tuple[int, Coverage] | None = field(init=False, default=None, repr=False)
    _unsupported: frozenset[str] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.key = idk_key(self.idk)
        self.ask = asking_clauses(self.question)

    def state(self, text: str) -> IdkState:
        return idk_state(text, self.key) if self.key else "no"

    def within_idk(self, text: str) -> bool:
        """`text` is (so far) the "I don't know" text itself, not an answer that starts like it."""
        return _norm(self.idk).startswith(_norm(text).rstrip())

    def stop(self) -> str | None:
        """Where an answer that is the "I don't know" text can stop: the start of its second sentence (None when it
        has one sentence)."""
        parts = _sentences(self.idk)
        if len(parts) < 2 or not parts[1].strip():
            return None
        second = parts[1].strip()
        cut = second.rfind(" ", 0, STOP_CHARS) if len(second) > STOP_CHARS else len(second)
        return second[: cut if cut > 0 else STOP_CHARS]

    def best(self) -> tuple[int, Coverage]:
        """The source number whose passage covers the question most, and that coverage (computed once)."""
        if self._best is None:
            covers = [self._coverage(text) for text in self.passages]
            n = max(range(len(covers)), key=lambda i: covers[i].share, default=0)
            self._best = (n + 1, covers[n] if covers else Coverage(0.0, frozenset()))
        return self._best

    def _coverage(self, text: str) -> Coverage:
        whole = question_coverage(text, self.question, previous=self.previous, idf=self.idf)
        if not self.ask:
            return whole
        asked = question_coverage(text, self.ask, previous=self.previous, idf=self.idf)
        return asked if asked.share > whole.share else whole

    def worth_it(self) -> bool:
        """The gate, noted in the record: a passage covers enough of the question to look again."""
        n, cover = self.best()
        self.record.update(source=n, coverage=round(cover.share, 3))
        if cover.share < self.min_coverage:
            self.record["skipped"] = f"coverage {cover.share:.2f} < {self.min_coverage:.2f}"
            return False
        return True

    def follow_up(self) -> str:
        n, cover = self.best()
        words = question_words(self.question, cover.terms) or question_words(self.previous, cover.terms)
        terms = _join(words) if words else "your question"
        return FOLLOW_UP.format(n=n, terms=terms)

    def lead(self) -> str:
        """The start of the answer a prefilled second look continues ("" without prefill)."""
        return LEAD.format(n=self.best()[0]) if self.prefill else ""

    def messages(self, messages: list[dict[str, str]], first: str) -> list[dict[str, str]]:
        """The second request: the first one's messages unchanged (the backend reuses their KV cache), then either the
        start of the answer to continue (prefill) or the model's own "I don't know" (as far as it went) and the
        follow-up."""
        self.record.update(ran=True, first_answer=first.strip()[:300])
        if self.prefill:
            self.record["lead"] = self.lead()
            return [*messages, {"role": "assistant", "content": self.lead()}]
        text = self.follow_up()
        self.record["follow_up"] = text
        return [*messages, {"role": "assistant", "content": first.strip()}, {"role": "user", "content": text}]

    def vet(self, text: str) -> bool:
        """Whether a second look's answer, from its first sentence, may be shown; notes the outcome: "answered", "idk"
        (it kept to "I don't know") or "rejected" (it repeats words of the question no source holds: the wifi password
        "of the branch" that source [3] only gives the address of)."""
        said = text[len(self.lead()) :] if self.lead() and text.startswith(self.lead()) else text
        if self.state(said) == "idk" or (self.key and self.key in _norm(said)) or self.restates_idk(said):
            self.record["outcome"] = "idk"
            return False
        echoed = self.echoes(said)
        if echoed:
            self.record.update(outcome="rejected", echoes=echoed, rejected_answer=text.strip()[:300])
            return False
        self.record["outcome"] = "answered"
        return True

    def restates_idk(self, said: str) -> bool:
        """The first sentence of `said` is mostly the "I don't know" text's own words (its contact line, say): no
        answer from the source."""
        def words(text: str) -> list[str]:
            return [w.rstrip(".'’-") for w in _WORD.findall(_norm(text))]

        said_words = words(_sentences(said)[0]) if said.strip() else []
        own = set(words(self.idk))
        return bool(said_words) and sum(w in own for w in said_words) >= IDK_WORDS_SHARE * len(said_words)

    def unsupported_terms(self) -> frozenset[str]:
        """The question's rare terms (see ECHO_IDF_SHARE) that none of the passages holds (computed once): an answer
        that repeats one talks about what the sources do not say. An amount or date the customer gave ("my card was
        used for $900") is their story, not a subject: the facts rail judges the figures an answer states."""
        if self._unsupported is None:
            from app.rag.bm25 import tokenize

            held = frozenset(t for text in self.passages for t in tokenize(text))
            known = held | {t.replace("-", "") for t in held if "-" in t}  # the source's "cut-off" is a "cutoff"
            asked = frozenset(tokenize(self.ask or self.question)) - CHAT_FILLER - known
            weigh = self.idf or (lambda _term: math.inf)
            rare = ECHO_IDF_SHARE * weigh("\x00unseen")  # the weight of a word no chunk holds
            self._unsupported = frozenset(t for t in asked if weigh(t) >= rare and not _DIGIT.search(t))
        return self._unsupported

    def echoes(self, said: str) -> list[str]:
        """The question's unsupported rare words (`unsupported_terms`) that `said` repeats."""
        from app.rag.bm25 import tokenize

        echoed = self.unsupported_terms() & frozenset(tokenize(said))
        return question_words(self.ask or self.question, echoed) if echoed else []

    def named_echoes(self, said: str) -> list[str]:
        """The `echoes` that `said` names as a thing: after an article, a possessive or a preposition ("to France",
        "your Netflix payment", "a safe deposit box"), or capitalised inside the sentence. A first answer restates the
        customer's own actions in their words ("If you miss the cutoff...", "sent fast"): not a subject it invents."""
        from app.rag.bm25 import tokenize

        echoed = self.unsupported_terms() & frozenset(tokenize(said))
        words = _WORD.findall(said)
        named: set[str] = set()
        for i, word in enumerate(words):
            terms = frozenset(tokenize(word)) & echoed
            if terms and i > 0 and (words[i - 1].lower() in _NAMING_WORDS or word[:1].isupper()):
                named |= terms
        return question_words(self.ask or self.question, frozenset(named)) if named else []

    def vets_first_answer(self) -> bool:
        """Whether the first answer's first sentence must be held and vetted: the question has rare words no passage
        holds. Other questions stream at once (nothing to hold, no time to the first token lost)."""
        return self.vet_first_answers and bool(self.unsupported_terms())

    def vet_first(self, text: str) -> bool:
        """Whether the first answer (not the "I don't know"), from its first sentence, may be shown: one that repeats
        the question's rare words that no passage holds ("Yes, you can mail a cashier's check to France." when no
        source says a word about France) must state a figure the passages hold ("The cost to get your replacement card
        sent fast is $25." answers from the source in the customer's words). Noted as `first_answer_rejected`."""
        first = _sentences(text)[0] if text.strip() else ""
        echoed = self.named_echoes(first) if self.vet_first_answers else []
        if not echoed or self.states_source_figure(first):
            return True
        self.record["first_answer_rejected"] = {"echoes": echoed, "answer": first.strip()[:300]}
        return False

    def states_source_figure(self, sentence: str) -> bool:
        """`sentence` states an amount, number, time or phone number, and every fact it states is in the passages."""
        claimed = extract(sentence)
        if not (claimed.money or claimed.percent or claimed.times or claimed.numbers or claimed.phones):
            return False
        source_text = lookup_text(self.passages)
        return not unsupported_facts(sentence, known_facts(self.passages), source_text, source_text)


def enabled(settings: Any) -> bool:
    """`rag_second_look` (GUARDCHAT_RAG_SECOND_LOOK): on by default."""
    return bool(settings.rag_second_look)


def make_plan(
    settings: Any,
    *,
    idk: str,
    question: str,
    history: list[dict[str, str]],
    messages: list[dict[str, str]],
    sources: list[Any],
    idf: Callable[[str], float] | None,
    prefill_ok: bool = False,
) -> Plan | None:
    """The turn's plan, or None: switched off, no sources in the prompt, or a prompt without a sources block.
    `prefill_ok`: the backend continues a final assistant message. `rag_second_look_mode`
    (GUARDCHAT_RAG_SECOND_LOOK_MODE): `auto` prefills then, `follow_up` never, `prefill` always."""
    if not sources or not idk.strip() or not enabled(settings) or not messages or messages[0]["role"] != "system":
        return None
    from app.rag.chain import prompt_passages

    passages = prompt_passages(messages[0]["content"], sources)
    if not passages:
        return None
    previous = next((m["content"] for m in reversed(history) if m.get("role") == "user"), "")
    min_coverage = float(settings.rag_second_look_coverage)
    mode = str(settings.rag_second_look_mode)
    prefill = mode == "prefill" or (mode == "auto" and prefill_ok)
    return Plan(
        idk, question, passages, previous=previous, idf=idf, min_coverage=min_coverage, prefill=prefill,
        vet_first_answers=bool(settings.rag_first_answer_vet),
    )
