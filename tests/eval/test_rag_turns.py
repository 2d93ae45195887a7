"""The turn-based RAG eval: answer matching, scoring (facts, kinds, targets) on given outcomes, and whole
conversations driven through the real turn pipeline — a running server (SSE + X-Session-Id) and in-process
(`TurnRunner` with a session) — on the embedded SmolLM2."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from app.eval.rag import rescore, run_rag_eval, turn_answers
from app.eval.rag_score import summarise, unsupported_sentences, verdict
from app.eval.rag_turns import ServerDriver, TurnOutcome, as_turn_task, contains_expected, load_tasks, normalise
from app.rag.chain import DEFAULT_IDK
from app.settings import Settings
from tests.fixtures.server import LiveServer

CONVERSATION: dict[str, Any] = {"kind": "conversation", "turns": [
    {"user": "Hi, my name is Priya."},
    {"user": "How much does an outgoing domestic wire cost?"},
    {"user": "what was my name?", "answer_contains": ["Priya"], "from": "conversation"},
]}
FOLLOWUP: dict[str, Any] = {"kind": "followup", "turns": [
    {"user": "How much is an international wire?"},
    {"user": "and how long does it take to arrive?", "gold_document_ids": ["wire-transfers"],
     "answer_contains": [["1-5", "1 to 5"]]},
]}


def test_normalised_matching() -> None:
    assert normalise("Send by **4:00 p.m. ET**; fee $1,500.00 – 2") == "send by 4 pm et; fee $1500 - 2"
    assert contains_expected("It arrives in 1–5 business days and costs $45.", ["$45", ["1-5", "1 to 5"]])
    assert not contains_expected("It costs $45.", ["$45", ["1-5", "1 to 5"]])
    assert as_turn_task({"question": "q?", "gold_document_ids": []})["kind"] == "unanswerable"


def test_unsupported_facts_read_the_sources_and_the_conversation() -> None:
    sources = ["Wire Transfers\nAn outgoing domestic wire costs $25. Cut-off: 4:00 p.m. ET."]
    assert unsupported_sentences("A domestic wire costs $25 [1]. Send it by 4 pm.", sources, DEFAULT_IDK) == []
    assert unsupported_sentences("It costs $35.", sources, DEFAULT_IDK) == ["It costs $35."]
    assert unsupported_sentences("You said $3,000.", sources + ["I want to send $3,000"], DEFAULT_IDK) == []


def test_scoring_counts_kinds_refusals_and_blocked_facts() -> None:
    tasks = [
        {"kind": "fees",
         "turns": [{"user": "late fee?", "answer_contains": ["$40"], "gold_document_ids": ["credit-cards"]}]},
        {"kind": "fees", "turns": [{"user": "stop payment fee?", "answer_contains": ["$30"]}]},
        {"kind": "unanswerable", "turns": [{"user": "notary?", "unanswerable": True}]},
        {"kind": "single", "turns": [{"user": "wire fee?", "answer_contains": ["$25"]}]},
        {"kind": "single", "turns": [{"user": "wire cut-off?", "answer_contains": ["4 pm"]}]},
        {"kind": "alarming",
         "turns": [{"user": "card stolen at gunpoint", "answer_contains": [["lock", "1-800-555-0142"]]}]},
    ]
    results = [
        [TurnOutcome("late fee?", "The late fee is up to $40 [1].", citations=[{"document_id": "credit-cards"}],
                     retrieved_ids=["c1"], ttft_ms=100.0, total_ms=900.0)],
        [TurnOutcome("stop payment fee?", "I can't help with legal advice.", blocked=True, blocked_by="topical",
                     ttft_ms=50.0, total_ms=60.0)],
        [TurnOutcome("notary?", DEFAULT_IDK, ttft_ms=10.0, total_ms=20.0)],
        [TurnOutcome("wire fee?", "A wire costs $99.", retrieved_ids=["c2"], ttft_ms=200.0, total_ms=1000.0)],
        # The facts rail replaced an answer stating a figure no source holds: the customer saw "I don't know".
        [TurnOutcome("wire cut-off?", DEFAULT_IDK, blocked=True, blocked_by="groundedness", retrieved_ids=["c2"],
                     ttft_ms=300.0, total_ms=1200.0)],
        # An "I don't know" quoting the contact line holds an expected phone number: still not correct.
        [TurnOutcome("card stolen at gunpoint", "I don't know, call us at 1-800-555-0142.", ttft_ms=400.0,
                     total_ms=500.0)],
    ]
    texts = {"c1": "Credit cards\nLate payment fee: up to $40.", "c2": "Wires\nOutgoing domestic: $25."}
    report = summarise(tasks, results, chunk_texts=lambda ids: [texts[i] for i in ids], idk_text=DEFAULT_IDK)
    fees = report["by_kind"]["fees"]
    assert (fees["n"], fees["correct"], fees["refused"], fees["blocked_by"]) == (2, 1, 1, {"topical": 1})
    assert fees["citation_precision"] == 1.0
    assert report["by_kind"]["unanswerable"]["abstain_rate"] == 1.0
    single = report["by_kind"]["single"]
    assert (single["correct_rate"], single["idk_rate"], single["refused"], single["blocked_by"]) == (
        0.0, 0.5, 0, {"groundedness": 1})
    facts = report["unsupported_facts"]
    assert (facts["answers"], facts["shown_sentences"], facts["blocked_by_groundedness"]) == (6, 1, 1)
    assert report["by_kind"]["alarming"]["correct"] == 0 and report["by_kind"]["alarming"]["idk_rate"] == 1.0
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["fee / penalty / deadline questions refused"]["met"] is False
    assert report["ttft_ms"]["p50"] == 150.0 and report["ttft_ms"]["n"] == 6
    assert [verdict(t, r) for t, r in zip(tasks, results, strict=True)] == [
        "ok", "refused:topical", "idk", "wrong", "idk:groundedness", "idk"]


def test_conversation_through_the_server_keeps_its_session(eval_server: LiveServer, base_settings: Settings) -> None:
    async def run() -> list[TurnOutcome]:
        driver = ServerDriver(eval_server.url)
        try:
            session = await driver.new_session()
            return [await driver.turn(session, t["user"]) for t in CONVERSATION["turns"]]
        finally:
            await driver.aclose()

    outcomes = asyncio.run(run())
    assert len(outcomes) == 3 and all(o.error is None and o.answer for o in outcomes)
    # The third turn was answered from the session's history (not the knowledge base): the server kept it.
    assert outcomes[2].answered_from == "conversation" or outcomes[2].blocked
    assert outcomes[1].retrieved_ids  # the wire question retrieved chunks, read back from the session's trace
    assert all(o.ttft_ms is not None and 0 < o.ttft_ms <= o.total_ms for o in outcomes)


def test_in_process_eval_runs_every_turn(base_settings: Settings) -> None:
    report = asyncio.run(turn_answers([CONVERSATION, FOLLOWUP], base_settings))
    turns = report["turns"]
    assert (turns["tasks"], turns["turns"]) == (2, 5)
    assert set(turns["by_kind"]) == {"conversation", "followup"}
    # "what was my name?" passes the input rails and is answered from the history. What SmolLM2 then says may be
    # blocked by an output rail (sampling: the turn is then also "refused"), so only the routing is asserted.
    assert turns["by_kind"]["conversation"]["routed_to_history"] == 1, report
    assert turns["ttft_ms"]["n"] >= 4 and turns["unsupported_facts"]["answers"] == 5


def test_cli_entry_filters_and_writes_the_report(eval_server: LiveServer, base_settings: Settings,
                                                 tmp_path: Path) -> None:
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps(CONVERSATION) + "\n" + json.dumps(FOLLOWUP) + "\n")
    assert [t["kind"] for t in load_tasks([data], kinds=["followup"])] == ["followup"]
    out = tmp_path / "rag"
    report = run_rag_eval([data], base_settings, server=eval_server.url, out_dir=out, kinds=["followup"],
                          retrieval=False)
    assert "retrieval" not in report
    assert report["answers"]["turns"]["by_kind"]["followup"]["n"] == 1
    markdown = (out / "rag.md").read_text()
    assert "## Targets" in markdown and "unsupported facts" in markdown and "| followup | 1 |" in markdown
    # Each task's turns were logged as it finished; scoring the log again gives the same numbers.
    again = rescore(out / "rag_turns.jsonl", base_settings, tmp_path / "again")
    assert again["answers"]["turns"]["by_kind"] == report["answers"]["turns"]["by_kind"]
    assert again["answers"]["turns"]["unsupported_facts"] == report["answers"]["turns"]["unsupported_facts"]
