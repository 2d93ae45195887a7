"""Formatting of one turn for the chat: badge, citations, "why?", escaping, session restore, feedback."""

from __future__ import annotations

from app.guard.base import RailResult
from app.sessions.base import Turn
from app.ui.render import (
    assistant_markdown,
    block_badge_html,
    citations_html,
    feedback_score,
    feedback_values,
    history_messages,
    why_html,
)

CITATION = {
    "id": 2,
    "document_id": "wire-transfers",
    "source": "wire-transfers.md",
    "title": "Wire Transfers",
    "section": "Fees",
    "snippet": "An outgoing international wire costs $45.",
}


def test_badge_names_the_blocking_rail_and_categories_only_when_blocked() -> None:
    rails = [RailResult("topic", "allow").to_dict(), RailResult("safety_input", "block", ["S9", "S2"]).to_dict()]
    badge = block_badge_html({"blocked": True, "rails": rails})
    assert "Blocked by safety_input (S9, S2)" in badge and "topic" not in badge
    assert block_badge_html({"blocked": False, "rails": rails}) == ""


def test_badge_reports_a_guard_that_could_not_run() -> None:
    rails = [RailResult("safety_input", "error", detail="guard_error: timeout").to_dict()]
    assert "safety_input – check could not run" in block_badge_html({"blocked": True, "rails": rails})


def test_citations_are_expandable_and_numbered_like_the_answer() -> None:
    html = citations_html([CITATION])
    assert html.count("<details") == 1
    assert "<summary>[2] Wire Transfers – Fees</summary>" in html
    assert "international wire costs $45" in html
    assert citations_html([]) == ""


def test_everything_from_outside_is_escaped() -> None:
    evil = {**CITATION, "title": "<img src=x onerror=alert(1)>", "snippet": "<script>x</script>"}
    rendered = assistant_markdown("<b>hi</b> **bold**", {"blocked": False, "citations": [evil], "rails": []})
    assert "<script>" not in rendered and "<img" not in rendered and "<b>hi" not in rendered
    assert "&lt;b&gt;hi&lt;/b&gt; **bold**" in rendered  # the model's Markdown survives


def test_why_lists_rails_timings_and_trace() -> None:
    guardchat = {
        "rails": [RailResult("attack", "allow", score=0.01, latency_ms=3.2).to_dict()],
        "timings_ms": {"input_rails": 12.4, "total": 80.0},
    }
    html = why_html(guardchat, {"rails_version": "3"})
    assert "<summary>why?</summary>" in html
    assert "<td>attack</td><td>allow</td>" in html and "total 80 ms" in html and "rails_version" in html


def test_history_restores_messages_turn_ids_and_feedback() -> None:
    ok = Turn(id="t1", user="How do I lock my card?", answer="Use the app [1].",
              metadata={"blocked": False, "citations": [CITATION], "rails": [], "trace": {"x": 1}}, feedback=1)
    blocked = Turn(id="t2", user="jailbreak", answer="No.", status="blocked", blocked=True,
                   metadata={"blocked": True, "rails": [RailResult("attack", "block").to_dict()]})
    turns = [ok.model_dump(), blocked.model_dump()]
    messages, turn_ids = history_messages(turns)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert turn_ids == [None, "t1", None, "t2"]
    assert "gc-citation" in messages[1]["content"] and "Blocked by attack" in messages[3]["content"]
    assert feedback_values(turns) == ["Like", None]


def test_feedback_scores() -> None:
    assert [feedback_score(v) for v in (True, False, "Like", "Dislike", None)] == [1, -1, 1, -1, 0]  # type: ignore[arg-type]
