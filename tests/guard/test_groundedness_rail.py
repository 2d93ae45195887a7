"""The groundedness rail's policy comes from the rails config: flag (default) or block, threshold, judge."""

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


async def test_by_default_an_invented_claim_is_flagged_once_and_the_answer_stands(
    embedder, detector, embedded_judge
) -> None:
    guard = await _guard(_files(None), embedder, detector, embedded_judge)
    assert guard.grounding_blocks is False
    flagged = await guard.check_groundedness(QUESTION, f"{GROUNDED} {INVENTED}", CONTEXT)
    assert flagged.allowed
    [rail] = flagged.rails  # only the groundedness flow ran: no second safety check of the answer
    assert (rail.name, rail.verdict) == ("groundedness", "flag") and "cruise" in (rail.detail or "")
    grounded = await guard.check_groundedness(QUESTION, GROUNDED, CONTEXT)
    assert grounded.allowed and grounded.rails[0].verdict == "allow"


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
