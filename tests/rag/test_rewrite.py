from __future__ import annotations

from app.llm.client import OpenAICompatClient
from app.llm.llamacpp import LlamaCppClient
from app.rag.rewrite import looks_like_follow_up, rewrite_query

HISTORY = [("How much does a domestic wire cost?", "A domestic wire costs $25 [1].")]


async def test_join_mode() -> None:
    standalone = await rewrite_query("What is the APY of the Saver Plus savings account today?", HISTORY, "join", None)
    assert (standalone.query, standalone.mode) == ("What is the APY of the Saver Plus savings account today?", "none")
    follow_up = await rewrite_query("and international ones?", HISTORY, "join", None)
    assert follow_up.mode == "join"
    assert follow_up.query == "How much does a domestic wire cost? and international ones?"
    assert (await rewrite_query("and international ones?", [], "join", None)).query == "and international ones?"
    assert looks_like_follow_up("Is it free?") and not looks_like_follow_up(
        "How do I order a replacement debit card for my checking account?"
    )


async def test_llm_mode_with_the_real_model(embedded_llm_url: str) -> None:
    client = LlamaCppClient(embedded_llm_url, "smollm2-135m", timeout_s=60)
    try:
        rewrite = await rewrite_query("and international ones?", HISTORY, "llm", client)
    finally:
        await client.aclose()
    assert rewrite.mode == "llm" and rewrite.query and rewrite.error is None and rewrite.latency_ms > 0


async def test_llm_mode_falls_back_to_join_on_error() -> None:
    client = OpenAICompatClient("http://127.0.0.1:9/v1", "nobody", timeout_s=2, max_retries=0)
    try:
        rewrite = await rewrite_query("and international ones?", HISTORY, "llm", client)
    finally:
        await client.aclose()
    assert rewrite.mode == "join" and rewrite.error
    assert rewrite.query == "How much does a domestic wire cost? and international ones?"


def test_follow_ups_retrieve_what_their_standalone_question_would() -> None:
    """tests/data/rag_followups.jsonl on the shipped knowledge base (bench/followup_retrieval.py): the follow-up's
    query finds a gold document in the top 5 (before item 2 of issue 18: 0.883; new topics 8/12)."""
    from bench.followup_retrieval import TASKS, run

    report = run(TASKS, 5)
    assert report["hit@5"]["rewritten"] >= 0.95, report["misses"]
    assert report["rewritten_by_kind"]["new_topic"] == "12/12", report["misses"]


async def test_an_implicit_follow_up_is_marked_for_retrieval_to_settle() -> None:
    short = await rewrite_query("how long does the replacement take", HISTORY, "join", None)
    assert short.mode == "join" and short.implicit  # no back-reference: retrieval may keep it alone
    # A last word that leaves its object to the conversation ("go over" what?) points back: never searched alone.
    dangling = await rewrite_query("what happens if i go over", HISTORY, "join", None)
    assert dangling.mode == "join" and not dangling.implicit
    explicit = await rewrite_query("and international ones?", HISTORY, "join", None)
    assert not explicit.implicit
