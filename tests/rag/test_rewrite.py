from __future__ import annotations

from app.llm.client import OpenAICompatClient
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
    client = OpenAICompatClient(embedded_llm_url, "smollm2-135m", flavor="embedded", timeout_s=60)
    try:
        rewrite = await rewrite_query("and international ones?", HISTORY, "llm", client)
    finally:
        await client.aclose()
    assert rewrite.mode == "llm" and rewrite.query and rewrite.error is None and rewrite.latency_ms > 0


async def test_llm_mode_falls_back_to_join_on_error() -> None:
    client = OpenAICompatClient("http://127.0.0.1:9/v1", "nobody", flavor="openai", timeout_s=2, max_retries=0)
    try:
        rewrite = await rewrite_query("and international ones?", HISTORY, "llm", client)
    finally:
        await client.aclose()
    assert rewrite.mode == "join" and rewrite.error
    assert rewrite.query == "How much does a domestic wire cost? and international ones?"
