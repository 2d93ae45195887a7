"""Scores the turns `app/eval/rag_turns.py` ran: per kind, correctness (`answer_contains`, normalised), "I don't
know" on answerable and unanswerable turns, refusals and the rail that refused, citations, TTFT, and the
unsupported-fact rate.

Unsupported facts (per 100 answers): every answer the customer saw is split into sentences and each sentence's
amounts, numbers, times, phone numbers and named policies (app/rag/facts.py) are looked up in what the turn could
know: the chunks retrieval gave it, the conversation so far (the customer's messages and the answers already
shown) and the "I don't know" text. A sentence with a fact none of them holds counts once. An answer the
groundedness rail blocked counts once too: the model stated a fact no source holds and the rail stopped it (the
customer saw a refusal instead), so the rate says how often the model invents figures, not only how often one gets
through. Both parts are also reported apart.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

from app.eval.rag_turns import KINDS, TurnOutcome, contains_expected, is_scored

ANSWERABLE_KINDS = ("single", "fees", "alarming", "followup", "conversation")
# (label, metric key, kind(s), comparison, target) — the targets, read off the summary.
TARGETS = (
    ("single-turn questions correct", "correct_rate", ("single", "fees"), ">=", 0.85),
    ("follow-ups correct", "correct_rate", ("followup",), ">=", 0.80),
    ("alarming-sounding ordinary questions correct", "correct_rate", ("alarming",), ">=", 0.85),
    ("conversation questions answered from the history", "answered_rate", ("conversation",), ">=", 0.90),
    ("fee / penalty / deadline questions refused", "refused", ("fees",), "<=", 0),
    ("unanswerable -> \"I don't know\" (or refused)", "abstain_rate", ("unanswerable",), ">=", 0.90),
    ("answerable -> \"I don't know\"", "idk_rate", ANSWERABLE_KINDS, "<=", 0.10),
)

ChunkTexts = Callable[[list[str]], list[str]]  # chunk ids -> their texts (title + content)


def is_idk(answer: str) -> bool:
    from app.eval.retrieval import is_idk as idk  # one definition for both RAG evals

    return idk(answer)


def unsupported_sentences(answer: str, known_texts: list[str], idk_text: str) -> list[str]:
    """The sentences of `answer` stating a fact that none of `known_texts` holds."""
    from app.rag.facts import known_facts, lookup_text, unsupported_facts
    from app.rag.grounding import fact_sentences

    sentences = fact_sentences(answer, idk_text)
    if not sentences:
        return []
    texts = [*known_texts, idk_text]
    facts, known_text = known_facts(texts), lookup_text(texts)
    return [s for s in sentences if unsupported_facts(s, facts, known_text)]


def verdict(task: dict[str, Any], outcomes: list[TurnOutcome]) -> str:
    """One word for the progress line: how the task's last scored turn went."""
    scored = [(t, o) for t, o in zip(task["turns"], outcomes, strict=False) if is_scored(t)]
    if outcomes and outcomes[-1].error:
        return "error"
    if not scored:
        return "done"
    turn, out = scored[-1]
    if out.blocked:
        return f"{'idk' if is_idk(out.answer) else 'refused'}:{out.blocked_by or '?'}"
    if turn.get("unanswerable"):
        return "idk" if is_idk(out.answer) else "answered"
    if is_idk(out.answer):
        return "idk"
    return "ok" if contains_expected(out.answer, turn["answer_contains"]) else "wrong"


def _rate(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 1), "p95": round(p95, 1), "n": len(ordered)}


class _Kind:
    """Counts for one kind of task (its scored turns)."""

    def __init__(self) -> None:
        self.n = self.correct = self.idk = self.refused = self.answered = self.with_citation = 0
        self.cited = self.cited_gold = self.errors = self.routed_to_history = 0
        self.refused_by: Counter[str] = Counter()

    def add(self, turn: dict[str, Any], out: TurnOutcome) -> None:
        self.n += 1
        if out.error:
            self.errors += 1
            return
        # What the customer saw: "I don't know" (the model's own, the no-source reply, or the groundedness rail's
        # replacement), a refusal (any other rail), or an answer.
        idk = is_idk(out.answer)
        self.idk += int(idk)
        self.refused += int(out.blocked and not idk)
        if out.blocked:
            self.refused_by[out.blocked_by or "unknown"] += 1
        self.answered += int(not out.blocked and not idk)
        self.routed_to_history += int(out.answered_from == "conversation")
        if not turn.get("unanswerable"):  # an "I don't know" is never correct, whatever contact line it quotes
            self.correct += int(not out.blocked and not idk and contains_expected(out.answer, turn["answer_contains"]))
        docs = [c.get("document_id") for c in out.citations]
        self.with_citation += int(bool(docs))
        gold = set(turn.get("gold_document_ids") or [])
        if gold:
            self.cited += len(docs)
            self.cited_gold += sum(1 for d in docs if d in gold)

    def summary(self, unanswerable: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n, "errors": self.errors, "idk_rate": _rate(self.idk, self.n),
            "refused": self.refused, "refused_rate": _rate(self.refused, self.n),
            "blocked_by": dict(self.refused_by),  # every rail block, those shown as "I don't know" included
            "answered_rate": _rate(self.answered, self.n), "routed_to_history": self.routed_to_history,
            "with_citation_rate": _rate(self.with_citation, self.n),
            "citation_precision": _rate(self.cited_gold, self.cited),
        }
        if unanswerable:
            out["abstain_rate"] = _rate(self.idk + self.refused, self.n)
        else:
            out["correct"] = self.correct
            out["correct_rate"] = _rate(self.correct, self.n)
            # Answered, but without the expected facts: a confident wrong answer, worse for a bank than "I don't know".
            out["wrong_rate"] = _rate(self.answered - self.correct, self.n)
        return out


def _fact_counts(task: dict[str, Any], outcomes: list[TurnOutcome], chunk_texts: ChunkTexts,
                 idk_text: str) -> tuple[int, int, int, list[dict[str, Any]]]:
    """(answers, unsupported sentences shown, answers blocked by groundedness, examples) for one task."""
    answers = shown = blocked = 0
    examples: list[dict[str, Any]] = []
    said: list[str] = []  # the conversation so far: an answer may repeat what the customer or the bot said
    for out in outcomes:
        if out.error:
            continue
        said.append(out.user)
        answers += 1
        if out.blocked:
            blocked += int(out.blocked_by == "groundedness")
        else:
            # The sources are what the model read: the prompt's (a whole answer page), else what retrieval gave.
            known = chunk_texts(out.source_ids or out.retrieved_ids)
            found = unsupported_sentences(out.answer, known + said, idk_text)
            shown += len(found)
            if found:
                examples.append({"user": out.user, "sentences": found})
        said.append(out.answer)
    return answers, shown, blocked, examples


def summarise(tasks: list[dict[str, Any]], results: list[list[TurnOutcome]], *, chunk_texts: ChunkTexts,
              idk_text: str) -> dict[str, Any]:
    """The report's `turns` section: per kind, overall, targets, timings, unsupported facts and examples."""
    kinds: dict[str, _Kind] = {}
    ttft: list[float] = []
    totals: list[float] = []
    answers = shown = blocked = 0
    fact_examples: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for task, outcomes in zip(tasks, results, strict=True):
        for turn, out in zip(task["turns"], outcomes, strict=False):
            if out.ttft_ms is not None:
                ttft.append(out.ttft_ms)
            if not out.error:
                totals.append(out.total_ms)
            if is_scored(turn):
                kinds.setdefault(task["kind"], _Kind()).add(turn, out)
        a, s, b, ex = _fact_counts(task, outcomes, chunk_texts, idk_text)
        answers, shown, blocked = answers + a, shown + s, blocked + b
        fact_examples += [{"kind": task["kind"], **e} for e in ex]
        word = verdict(task, outcomes)
        if word not in ("ok", "done") and not (word.startswith(("idk", "refused")) and task["kind"] == "unanswerable"):
            failures.append({"kind": task["kind"], "verdict": word, "turns": [
                {"user": o.user, "answer": o.answer[:300], "blocked_by": o.blocked_by, "error": o.error}
                for o in outcomes]})
    by_kind = {k: kinds[k].summary(k == "unanswerable") for k in sorted(kinds, key=_kind_order)}
    report: dict[str, Any] = {
        "tasks": len(tasks),
        "turns": sum(len(r) for r in results),
        "by_kind": by_kind,
        "ttft_ms": _percentiles(ttft),
        "turn_ms": _percentiles(totals),
        "unsupported_facts": {
            "answers": answers, "shown_sentences": shown, "blocked_by_groundedness": blocked,
            "per_100_answers": _rate(100 * (shown + blocked), answers),
            "shown_per_100_answers": _rate(100 * shown, answers),
            "blocked_per_100_answers": _rate(100 * blocked, answers),
            "examples": fact_examples[:20],
        },
        "failures": failures,
    }
    report["targets"] = targets(by_kind, report["unsupported_facts"]["per_100_answers"])
    return report


def _kind_order(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def pooled(by_kind: dict[str, dict[str, Any]], kinds: tuple[str, ...], key: str) -> float | None:
    """A rate over several kinds, weighted by their sizes (`refused`: the summed count)."""
    picked = [by_kind[k] for k in kinds if k in by_kind]
    if key == "refused":
        return float(sum(p["refused"] for p in picked)) if picked else None
    n = sum(p["n"] for p in picked if p.get(key) is not None)
    return round(sum(p[key] * p["n"] for p in picked if p.get(key) is not None) / n, 4) if n else None


def targets(by_kind: dict[str, dict[str, Any]], unsupported_per_100: float | None) -> list[dict[str, Any]]:
    rows = []
    for label, key, kinds, op, goal in TARGETS:
        value = pooled(by_kind, kinds, key)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        rows.append({"target": label, "value": value, "goal": f"{op} {goal}", "met": met,
                     "n": sum(by_kind[k]["n"] for k in kinds if k in by_kind)})
    met = None if unsupported_per_100 is None else unsupported_per_100 <= 2
    rows.append({"target": "unsupported facts per 100 answers", "value": unsupported_per_100, "goal": "<= 2",
                 "met": met, "n": None})
    return rows


def legacy_answer_keys(tasks: list[dict[str, Any]], results: list[list[TurnOutcome]]) -> dict[str, Any]:
    """The single-question report keys earlier reports had (accuracy, IDK rates, citations, examples)."""
    answerable: list[tuple[dict[str, Any], TurnOutcome]] = []
    unanswerable: list[TurnOutcome] = []
    for task, outcomes in zip(tasks, results, strict=True):
        for turn, out in zip(task["turns"], outcomes, strict=False):
            if turn.get("unanswerable"):
                unanswerable.append(out)
            elif is_scored(turn):
                answerable.append((turn, out))
    cited = cited_gold = with_citation = correct = idk = 0
    examples: list[dict[str, Any]] = []
    for turn, out in answerable:
        docs = [c.get("document_id") for c in out.citations]
        gold = set(turn.get("gold_document_ids") or [])
        cited += len(docs) if gold else 0
        cited_gold += sum(1 for d in docs if d in gold)
        with_citation += int(bool(docs))
        said_idk = is_idk(out.answer)
        correct += int(not out.blocked and not said_idk and contains_expected(out.answer, turn["answer_contains"]))
        idk += int(said_idk)
        if len(examples) < 20:
            examples.append({"question": out.user, "answer": out.answer[:400], "cited": docs, "gold": sorted(gold)})
    return {
        "answerable": len(answerable), "unanswerable": len(unanswerable),
        "citation_precision": _rate(cited_gold, cited), "answers_with_citations": _rate(with_citation, len(answerable)),
        "answer_accuracy_contains": _rate(correct, len(answerable)),
        "idk_rate_unanswerable": _rate(sum(1 for o in unanswerable if o.blocked or is_idk(o.answer)),
                                       len(unanswerable)),
        "idk_rate_answerable": _rate(idk, len(answerable)),
        "examples": examples,
    }
