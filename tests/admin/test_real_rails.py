"""The publisher with the real validator (app.guard.validate, incl. the config's rails tests) and the real
guard builder (NeMo Guardrails + MiniLM + detector), on the project's own rails config reduced to the
topical rail: it needs no LLM judge, so these tests need no model server."""

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.admin.paths import read_rails_dir
from app.admin.publisher import RailsInvalid, RailsPublisher
from app.admin.versions import FileRailsVersionStore
from app.admin.wiring import builder_for, validator_for
from app.guard.base import Guard
from app.guard.detector import Detector
from app.rag.embedder import MiniLMEmbedder
from app.settings import PROJECT_ROOT, Settings
from app.state import LiveRails, LoadedRails

pytestmark = pytest.mark.slow

STOCKS = "Should I buy Apple stock this week?"
PASSWORD = "How do I reset my online banking password?"
CHECKS = f"""tests:
  - user: "{STOCKS}"
    expect: blocked
    rail: topic
  - user: "{PASSWORD}"
    expect: allowed
"""


def topic_only_config() -> dict[str, str]:
    files = {p: t for p, t in read_rails_dir(PROJECT_ROOT / "rails").items() if not p.startswith("tests/")}
    config = files["config.yml"]
    for flow in ("guardchat check input safety", "guardchat check attack"):
        assert f"      - {flow}\n" in config
        config = config.replace(f"      - {flow}\n", "")
    output_flows = "      - guardchat check output safety\n      - guardchat check groundedness\n"
    assert output_flows in config
    files["config.yml"] = config.replace(output_flows, "      []\n")
    files["tests/admin_checks.yml"] = CHECKS
    return files


@pytest.fixture(scope="module")
def detector() -> Detector | None:
    try:
        return Detector.load()
    except Exception:
        return None


@pytest.fixture(scope="module")
async def seed_guard(embedder: MiniLMEmbedder, detector: Detector | None) -> Guard:
    """The guard the app would have built from its rails directory at start (built once per module)."""
    return await builder_for(Settings(), llm=None, embedder=embedder, detector=detector)(topic_only_config())


@pytest.fixture
async def publisher(
    tmp_path: Path, embedder: MiniLMEmbedder, detector: Detector | None, seed_guard: Guard
) -> AsyncIterator[RailsPublisher]:
    settings = Settings(data_dir=tmp_path)
    seed = topic_only_config()
    store = FileRailsVersionStore(tmp_path / "rails_versions")
    await store.ensure_seeded(seed)
    live = LiveRails(LoadedRails("local", seed_guard, seed))
    publisher = RailsPublisher(
        store,
        live,
        validator=validator_for(settings, llm=None, embedder=embedder, detector=detector),
        builder=builder_for(settings, llm=None, embedder=embedder, detector=detector),
        embedder=embedder,
    )
    await publisher.sync()  # same files: serves version 1 on the already built guard
    assert live.current.guard is seed_guard
    yield publisher
    await publisher.stop()


async def test_publish_validates_with_the_rails_tests_and_swaps_the_real_guard(publisher: RailsPublisher) -> None:
    live = publisher.live
    assert live.current.version == "1"
    seed = live.current.files
    new_text = "Sorry, investing is outside what this bank assistant can do."
    texts, replaced = re.subn(
        r'(define bot refuse investment advice\n  )"[^"\n]*"', rf'\1"{new_text}"', seed["texts.co"]
    )
    assert replaced == 1
    edited = {**seed, "texts.co": texts}
    old_guard = live.current.guard

    version = await publisher.publish(1, edited, "shorter refusal", "alice")
    assert version.number == 2 and live.current.version == "2" and live.current.guard is not old_guard
    decision = await live.current.guard.check_input([{"role": "user", "content": STOCKS}])
    assert not decision.allowed and decision.blocked_by == "topic" and decision.refusal == new_text
    assert (await live.current.guard.check_input([{"role": "user", "content": PASSWORD}])).allowed

    serving = live.current
    broken = {**edited, "config.yml": edited["config.yml"].replace("rails:\n", "rails: [\n", 1)}
    with pytest.raises(RailsInvalid) as invalid:
        await publisher.publish(2, broken, "broken", "bob")
    assert {(e["file"], e["line"] is not None) for e in invalid.value.outcome.errors} == {("config.yml", True)}

    wrong_expectation = {**edited, "tests/admin_checks.yml": CHECKS.replace("expect: blocked", "expect: allowed")}
    with pytest.raises(RailsInvalid) as failed:
        await publisher.publish(2, wrong_expectation, "wrong test", "bob")
    failures = [t for t in failed.value.outcome.tests if not t["passed"]]
    assert [(t["file"], t["line"], t["name"]) for t in failures] == [("tests/admin_checks.yml", 2, STOCKS)]
    assert live.current is serving and await publisher.store.live_number() == 2


async def test_try_runs_the_real_draft_rails(publisher: RailsPublisher) -> None:
    draft = publisher.live.current.files
    blocked = await publisher.try_draft(draft, STOCKS)
    assert blocked["input"]["allowed"] is False and blocked["input"]["rails"][0]["name"] == "topic"
    allowed = await publisher.try_draft(draft, PASSWORD, answer="Use 'Forgot password' on the sign-in page.")
    assert allowed["input"]["allowed"] is True and allowed["output"]["allowed"] is True
    assert publisher.live.current.version == "1"


async def test_eval_draft_measures_a_draft_without_publishing(publisher: RailsPublisher) -> None:
    rows = [
        {"text": STOCKS, "label": "off_topic"},
        {"text": "Is bitcoin a good investment for my retirement?", "label": "off_topic"},
        {"text": PASSWORD, "label": "on_domain"},
        {"text": "What is the fee for an outgoing domestic wire?", "label": "on_domain"},
    ]
    before = publisher.live.current.version
    report = await publisher.eval_draft(topic_only_config(), rows, kind="topic")
    overall = report["overall"]
    assert overall["block_rate"] == 1.0 and overall["false_refusal_rate"] == 0.0, overall
    assert publisher.live.current.version == before  # nothing published
