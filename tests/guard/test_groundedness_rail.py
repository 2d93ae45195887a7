"""The groundedness rail's policy comes from the rails config: facts (block, shipped) and similarity (action:
flag, shipped), threshold, judge."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from app.guard.rails import build_guard
from app.rag.grounding import CachedGroundingCheck
from app.settings import Settings
from tests.guard.conftest import RAILS_DIR

CONTEXT = [
    "Outgoing domestic wire transfers cost $25 each and must be submitted before 4 pm Eastern to be sent the same "
    "business day.",
]
QUESTION = [{"role": "user", "content": "How much is a domestic wire?"}]
GROUNDED = "Outgoing domestic wire transfers cost $25 each [1]."
INVENTED = "Every new customer also receives a free cruise to the Bahamas with their first wire [1]."


def _files(groundedness: str | None) -> dict[str, str]:
    """The shipped config, with its `guardchat.groundedness` block replaced by `groundedness` (a YAML flow map)."""
    files = {p.relative_to(RAILS_DIR).as_posix(): p.read_text() for p in RAILS_DIR.rglob("*.*")}
    if groundedness is not None:
        shipped = re.search(r"\n  groundedness:\n(?:    .*\n?)+", files["config.yml"])
        assert shipped, "the shipped config.yml has a guardchat.groundedness block"
        files["config.yml"] = files["config.yml"].replace(shipped.group(0), f"\n  groundedness: {groundedness}\n")
    return files


async def _guard(files: dict[str, str], embedder: Any, detector: Any, llm: Any) -> Any:
    return await asyncio.to_thread(
        build_guard,
        files,
        Settings(),
        llm=llm,
        embedder=embedder,
        detector=detector,
        grounding=CachedGroundingCheck(embedder),
    )


async def test_a_flagging_config_flags_an_invented_claim_once_and_the_answer_stands(
    embedder, detector, embedded_judge
) -> None:
    guard = await _guard(_files("{action: flag, facts: flag}"), embedder, detector, embedded_judge)
    assert guard.grounding_blocks is False
    flagged = await guard.check_groundedness(QUESTION, f"{GROUNDED} {INVENTED}", CONTEXT)
    assert flagged.allowed
    [rail] = flagged.rails  # only the groundedness flow ran: no second safety check of the answer
    assert (rail.name, rail.verdict) == ("groundedness", "flag") and "cruise" in (rail.detail or "")
    grounded = await guard.check_groundedness(QUESTION, GROUNDED, CONTEXT)
    assert grounded.allowed and grounded.rails[0].verdict == "allow"
    wrong_fee = await guard.check_groundedness(QUESTION, "Outgoing domestic wire transfers cost $35 each.", CONTEXT)
    assert wrong_fee.allowed and "unsupported facts" in (wrong_fee.rails[0].detail or "")  # recorded, shown


async def test_the_shipped_config_blocks_a_figure_no_source_states_with_the_idk_text(
    embedder, detector, embedded_judge
) -> None:
    """Issue 18's made-up answer: on topic, so similarity passes it; its figures are nowhere in the sources."""
    guard = await _guard(_files(None), embedder, detector, embedded_judge)
    assert guard.grounding_blocks is True
    context = [(RAILS_DIR.parent / "knowledge" / "wire-transfers.md").read_text()]
    question = [{"role": "user", "content": "And how long does it take to arrive?"}]
    invented = ("Domestic wires typically arrive within 2-3 business days, while international wires can take up "
                "to 10 days.")
    blocked = await guard.check_output(question, invented, context)
    assert not blocked.allowed and blocked.blocked_by == "groundedness" and not blocked.guard_error
    assert blocked.refusal == guard.texts.idk and "1-800-555-0142" in blocked.refusal  # the contact line
    rail = next(r for r in blocked.rails if r.name == "groundedness")
    assert "unsupported facts" in (rail.detail or "") and "10" in (rail.detail or "")  # what "why?" shows
    for grounded in (
        "International wires usually arrive in 1-5 business days [1].",  # the source writes 1–5
        "An outgoing international wire costs 45 dollars.",  # the source writes $45
        "Send a domestic wire by 4 pm ET and it goes out the same business day.",  # 4:00 p.m. ET
        f"I don't know. {guard.texts.idk}",  # the contact line's phone number is trusted
    ):
        decision = await guard.check_output(question, grounded, context)
        assert decision.allowed, (grounded, decision.rails)
    # The customer's own figure may be repeated: the question is read with the sources.
    own = [{"role": "user", "content": "I want to wire $3,000 abroad, what's the fee?"}]
    assert (await guard.check_output(own, "For your $3,000 wire the fee is $45 [1].", context)).allowed
    # A claim that is only far in wording from the sources (no figure) is flagged, not blocked: paraphrases
    # score low too, and the shipped similarity action is flag.
    flagged = await guard.check_groundedness(QUESTION, f"{GROUNDED} {INVENTED}", CONTEXT)
    assert flagged.allowed and flagged.rails[0].verdict == "flag"


async def test_a_blocking_config_refuses_an_invented_claim_with_the_idk_text(
    embedder, detector, embedded_judge
) -> None:
    guard = await _guard(_files("{action: block, judge: false}"), embedder, detector, embedded_judge)
    assert guard.grounding_blocks is True
    blocked = await guard.check_output(QUESTION, INVENTED, CONTEXT)
    assert not blocked.allowed and blocked.blocked_by == "groundedness" and not blocked.guard_error
    assert blocked.refusal == guard.texts.idk
    assert (await guard.check_output(QUESTION, GROUNDED, CONTEXT)).allowed


async def test_a_blocking_config_asks_the_judge_only_for_low_scores(embedder, detector, embedded_judge) -> None:
    guard = await _guard(_files("{action: block, judge: true, threshold: 0.35}"), embedder, detector, embedded_judge)
    grounded = await guard.check_output(QUESTION, GROUNDED, CONTEXT)
    detail = next(r.detail for r in grounded.rails if r.name == "groundedness") or ""
    assert grounded.allowed and "judge" not in detail  # supported by wording: no LLM call
    invented = await guard.check_output(QUESTION, INVENTED, CONTEXT)
    detail = next(r.detail for r in invented.rails if r.name == "groundedness") or ""
    assert detail.startswith("judge:")  # the (real, embedded) judge decided; its verdict is either way


async def test_an_unknown_groundedness_key_is_a_config_error(embedder, detector, embedded_judge) -> None:
    import pytest

    from app.guard.loader import RailsConfigError

    with pytest.raises(RailsConfigError, match="groundedness"):
        await _guard(_files("{action: warn}"), embedder, detector, embedded_judge)
