"""Builds the rails store and publisher from the settings (called from the app lifespan)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.admin.paths import read_rails_dir
from app.admin.prepare import Preparation, RedisPrepareChannel
from app.admin.publisher import GuardBuilder, RailsPublisher, RailsValidator, ValidationOutcome, version_label
from app.admin.versions import FileRailsVersionStore, RailsVersionStore
from app.guard.base import Guard
from app.settings import Settings
from app.state import AppState, LoadedRails

if TYPE_CHECKING:
    from app.guard.validate import ValidationReport

log = logging.getLogger(__name__)



def open_version_store(settings: Settings) -> RailsVersionStore:
    """Redis when `redis_url` is set (shared by all replicas), else files under `data_dir/rails_versions`."""
    if settings.redis_url:
        from app.admin.versions_redis import RedisRailsVersionStore
        from app.redis_client import redis_client

        client = redis_client(settings.redis_url, decode_responses=True)
        # `{rails}`: one Redis Cluster slot for every rails key, so the publish script may touch several.
        prefix = settings.redis_key_prefix + "{rails}:"
        return RedisRailsVersionStore(client, prefix, owns_client=True)
    return FileRailsVersionStore(settings.data_dir / "rails_versions")


def preparation_for(store: RailsVersionStore, builder: GuardBuilder) -> Preparation | None:
    """Build-before-announce needs a store every replica shares (Redis); the file store has one host."""
    from app.admin.versions_redis import RedisRailsVersionStore

    if not isinstance(store, RedisRailsVersionStore):
        return None
    return Preparation(RedisPrepareChannel(store.redis, store.prefix), builder)


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Awaits async callables; runs sync ones in a worker thread so a slow NeMo build does not stall turns."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    return await result if inspect.isawaitable(result) else result


def outcome_from_report(report: ValidationReport) -> ValidationOutcome:
    """`app.guard.validate.ValidationReport` -> the admin API's shape."""
    errors = [{"file": err.file or "", "line": err.line, "message": str(err.message)} for err in report.errors]
    tests = [
        {
            "name": result.case.name,
            "file": result.case.file,
            "line": result.case.line,
            "expect": result.case.expect,
            "got": result.got,
            "passed": result.passed,
            "detail": result.detail,
        }
        for result in report.tests
    ]
    return ValidationOutcome(errors=errors, tests=tests)


def validator_for(settings: Settings, *, llm: Any, embedder: Any, detector: Any = "auto") -> RailsValidator:
    """The real validator: `app.guard.validate.avalidate_rails` including the config's rails tests
    (async: the LLM client belongs to this event loop)."""

    async def validate(files: dict[str, str], run_tests: bool) -> ValidationOutcome:
        from app.guard.validate import avalidate_rails

        report = await avalidate_rails(
            files, settings, run_tests=run_tests, llm=llm, embedder=embedder, detector=detector
        )
        return outcome_from_report(report)

    return validate


def builder_for(
    settings: Settings, *, llm: Any, embedder: Any, detector: Any = None, grounding: Any = None
) -> GuardBuilder:
    """The real guard builder: `app.guard.rails.build_guard` on the published files, with the same
    detector and groundedness check as the guard the app built at start."""

    async def build(files: dict[str, str]) -> Guard:
        from app.guard.rails import build_guard

        guard: Guard = await _call(
            build_guard, files, settings, llm=llm, embedder=embedder, detector=detector, grounding=grounding
        )
        return guard

    return build


def _app_grounding(state: AppState) -> Any:
    """The groundedness check the app gives its start-up guard: a published guard without it would
    silently skip the groundedness rail. Prefer `state.grounding`; this is the fallback, the same check
    app/main.py builds."""
    from app.rag.grounding import CachedGroundingCheck

    return CachedGroundingCheck(state.embedder)


async def build_rails_publisher(state: AppState) -> RailsPublisher:
    """Opens the store (seeding version 1 from `settings.rails_dir` when empty), makes `state.rails`
    serve the store's live version, starts following it and registers the publisher in
    `state.rails_publisher`. Stop it with `await publisher.stop()` at shutdown."""
    settings = state.settings
    store = open_version_store(settings)
    disk_files = read_rails_dir(settings.rails_dir)
    try:
        live = await store.ensure_seeded(disk_files)
    except BaseException:
        await store.close()
        raise
    log.info("rails store: live version %d (%s)", live.number, type(store).__name__)
    current = state.rails.current
    if not current.version.isdigit() and live.files == disk_files:
        # The guard the lifespan built from settings.rails_dir already runs this exact content.
        await state.rails.swap(LoadedRails(version_label(live.number), current.guard, dict(live.files)))
    # The lifespan keeps the loaded detector (None without weights) in the state; validate with the same one.
    detector = state.detector
    grounding = state.grounding or _app_grounding(state)
    builder = builder_for(
        settings,
        llm=state.llm,
        embedder=state.embedder,
        detector=None if detector == "auto" else detector,
        grounding=grounding,
    )
    publisher = RailsPublisher(
        store,
        state.rails,
        validator=validator_for(settings, llm=state.llm, embedder=state.embedder, detector=detector),
        builder=builder,
        embedder=state.embedder,
        poll_interval_s=settings.rails_poll_interval_s,
        owns_store=True,
        preparation=preparation_for(store, builder),
    )
    await publisher.start()
    state.rails_publisher = publisher
    return publisher
