"""Shared pieces of the admin tests: a small rails config, stores on real Redis / real files, and the
validator + guard builder injected into `RailsPublisher`.

The injected validator and guard are deliberately small but real: the validator parses the YAML
(line numbers from PyYAML) and the guard blocks the words listed in `blocked_words.txt`, so a test
can tell which config version a replica is serving from what it decides.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis

from app.admin.publisher import RailsPublisher, ValidationOutcome
from app.admin.versions import FileRailsVersionStore, RailsVersionStore
from app.admin.versions_redis import RedisRailsVersionStore
from app.guard.base import AssistantTexts, GuardDecision, RailResult
from app.state import LiveRails, LoadedRails
from tests.fixtures.redis import delete_keys_with_prefix

BASE_FILES = {
    "config.yml": "models: []\nrails:\n  input:\n    flows:\n      - check blocked words\n",
    "blocked_words.txt": "bomb\n",
    "prompts/system.md": "You are a bank support assistant.\n",
}


def with_blocked(words: list[str], files: dict[str, str] | None = None) -> dict[str, str]:
    return {**(files or BASE_FILES), "blocked_words.txt": "".join(f"{w}\n" for w in words)}


class BlockedWordsGuard:
    """Blocks user messages (and answers) containing a word from the config's `blocked_words.txt`."""

    output_chunk_chars = 200
    output_context_chars = 400
    grounding_blocks = False
    engine_name = None  # no rails engine: the admin status reports none
    engine_reason = None

    def __init__(self, files: dict[str, str]) -> None:
        self.texts = AssistantTexts()
        self.words = [w.strip().lower() for w in files.get("blocked_words.txt", "").splitlines() if w.strip()]

    def _decide(self, rail: str, text: str) -> GuardDecision:
        hit = next((w for w in self.words if w in text.lower()), None)
        if hit:
            result = RailResult(rail, "block", categories=[hit])
            return GuardDecision(False, [result], blocked_by=rail, refusal=self.texts.refusal)
        return GuardDecision(True, [RailResult(rail, "allow")])

    def prefetch_input(self, messages: list[dict[str, str]]) -> None:
        return None

    async def check_input(self, messages: list[dict[str, str]], embedding: Any = None) -> GuardDecision:
        return self._decide("blocked_words_input", messages[-1]["content"])

    async def check_output(
        self, messages: list[dict[str, str]], answer: str, context: list[str] | None = None
    ) -> GuardDecision:
        return self._decide("blocked_words_output", answer)

    async def check_groundedness(
        self, messages: list[dict[str, str]], answer: str, context: list[str]
    ) -> GuardDecision:
        return GuardDecision(True, [])

    async def aclose(self) -> None:
        return None


class GuardFactory:
    """The injected builder; counts builds so tests can check a publish builds exactly one guard."""

    def __init__(self) -> None:
        self.builds = 0
        self.fail_on: str | None = None  # a blocked word whose config makes the build raise

    async def __call__(self, files: dict[str, str]) -> BlockedWordsGuard:
        self.builds += 1
        guard = BlockedWordsGuard(files)
        if self.fail_on and self.fail_on in guard.words:
            raise RuntimeError(f"cannot build a guard blocking {self.fail_on!r}")
        return guard


async def yaml_validator(files: dict[str, str], run_tests: bool) -> ValidationOutcome:
    """YAML syntax errors with their line; `run_tests` runs the config's one rails test: `bomb` must stay blocked."""
    errors: list[dict[str, Any]] = []
    for path, text in files.items():
        if path.endswith((".yml", ".yaml")):
            try:
                yaml.safe_load(text)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                line = mark.line + 1 if mark is not None else None
                errors.append({"file": path, "line": line, "message": str(getattr(exc, "problem", exc))})
    tests = []
    if run_tests and not errors:
        decision = await BlockedWordsGuard(files).check_input([{"role": "user", "content": "how to build a bomb"}])
        tests.append({"name": "blocks bomb", "passed": not decision.allowed})
    return ValidationOutcome(errors=errors, tests=tests)


def initial_live(files: dict[str, str] | None = None, version: str = "disk") -> LiveRails:
    files = dict(files or BASE_FILES)
    return LiveRails(LoadedRails(version, BlockedWordsGuard(files), files))


def make_publisher(store: RailsVersionStore, live: LiveRails, builder: GuardFactory | None = None) -> RailsPublisher:
    return RailsPublisher(store, live, validator=yaml_validator, builder=builder or GuardFactory(), poll_interval_s=1.0)


@asynccontextmanager
async def redis_store_pair(redis_url: str) -> AsyncIterator[tuple[RedisRailsVersionStore, RedisRailsVersionStore]]:
    """Two stores (two replicas: own clients) on one Redis, under a key prefix unique to the test."""
    prefix = f"guardchat-test:{uuid.uuid4().hex[:12]}:rails:"
    stores = [RedisRailsVersionStore(Redis.from_url(redis_url), prefix, owns_client=True) for _ in range(2)]
    try:
        yield stores[0], stores[1]
    finally:
        for store in stores:
            await store.close()
        delete_keys_with_prefix(redis_url, prefix)


@asynccontextmanager
async def open_store(kind: str, redis_url: str | None, tmp_path: Path) -> AsyncIterator[RailsVersionStore]:
    if kind == "file":
        yield FileRailsVersionStore(tmp_path / "rails_versions")
        return
    assert redis_url is not None
    async with redis_store_pair(redis_url) as (store, _):
        yield store
