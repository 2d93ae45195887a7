"""Publishing rails configs: check paths -> validate (incl. rails tests) -> build the guard once -> store the
version (compare-and-set) -> swap this replica's `LiveRails`. Every other replica follows the store: it
is woken by the store's change feed (Redis pub/sub) and also polls the live number every
`poll_interval_s`, then loads the new live version, builds its guard and swaps. With a `Preparation`
(Redis), the publishing replica first asks the others to build the new guard and announces the version
only once they have (app/admin/prepare.py), so they swap at once instead of building after the announcement.

The validator and the guard builder are injected (see `validator_for` / `builder_for` for the real
ones in app/guard), so a replica never serves a config that did not pass validation, and a publish
that fails anywhere before the compare-and-set leaves the live config untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.admin.paths import DEFAULT_LIMITS, FileLimits, check_files
from app.admin.prepare import PeerRequest, Preparation
from app.admin.versions import RailsVersion, RailsVersionStore, VersionConflict
from app.guard.base import Guard, GuardDecision
from app.rag.base import Embedder
from app.state import LiveRails, LoadedRails

log = logging.getLogger(__name__)


@dataclass
class ValidationOutcome:
    """A validation result in the admin API's shape: errors `{file, line, message}` and test results."""

    errors: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors and all(t.get("passed", True) for t in self.tests)

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "errors": self.errors, "tests": self.tests}


class RailsInvalid(Exception):
    """The submitted config was rejected (422); nothing was stored or swapped."""

    def __init__(self, outcome: ValidationOutcome) -> None:
        first = outcome.errors[0] if outcome.errors else None
        failed = [t for t in outcome.tests if not t.get("passed", True)]
        if first:
            where = f"{first.get('file') or 'config'}" + (f":{first['line']}" if first.get("line") else "")
            summary = f"{where}: {first.get('message')}"
        else:
            summary = f"{len(failed)} rails test(s) failed"
        super().__init__(f"Invalid rails config ({summary})")
        self.outcome = outcome


# (files, run_tests) -> outcome ; files -> guard. Both may be slow: they run NeMo and the rails tests.
RailsValidator = Callable[[dict[str, str], bool], Awaitable[ValidationOutcome]]
GuardBuilder = Callable[[dict[str, str]], Awaitable[Guard]]


def version_label(number: int) -> str:
    """`LoadedRails.version` of a stored version (the admin API speaks integers, LoadedRails strings)."""
    return str(number)


def _serving_number(live: LiveRails) -> int | None:
    try:
        return int(live.current.version)
    except (TypeError, ValueError):
        return None  # e.g. a config loaded from disk before the store was reached


class RailsPublisher:
    def __init__(
        self,
        store: RailsVersionStore,
        live: LiveRails,
        *,
        validator: RailsValidator,
        builder: GuardBuilder,
        embedder: Embedder | None = None,
        limits: FileLimits = DEFAULT_LIMITS,
        poll_interval_s: float = 1.0,
        owns_store: bool = False,
        retire_after_s: float = 600.0,
        preparation: Preparation | None = None,
    ) -> None:
        self.store = store
        self.live = live
        self.limits = limits
        self.poll_interval_s = poll_interval_s
        self._validator = validator
        self._builder = builder
        self._embedder = embedder
        self._owns_store = owns_store
        self.preparation = preparation
        # Held from the store's compare-and-set to the swap, and by `sync`, so a replica never builds
        # the version it is itself publishing a second time.
        self._apply_lock = asyncio.Lock()
        self._failed_number: int | None = None
        self.last_sync_error: str | None = None
        self.retire_after_s = retire_after_s  # longer than any turn can run on the replaced guard
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    # --- validation -------------------------------------------------------------------------------

    async def validate(self, files: Mapping[str, Any], *, run_tests: bool = True) -> ValidationOutcome:
        """Path/size checks first (nothing else sees rejected paths), then the rails validator."""
        path_errors = check_files(files, self.limits)
        if path_errors:
            return ValidationOutcome(errors=[e.to_dict() for e in path_errors])
        return await self._validator(dict(files), run_tests)

    async def _validated_guard(self, files: Mapping[str, Any], *, run_tests: bool) -> Guard:
        outcome = await self.validate(files, run_tests=run_tests)
        if not outcome.valid:
            raise RailsInvalid(outcome)
        try:
            return await self._builder(dict(files))
        except Exception as exc:  # the validator passed but NeMo still refused the config
            log.warning("building the rails guard failed: %s", exc)
            raise RailsInvalid(ValidationOutcome(errors=_errors_from_exception(exc))) from exc

    # --- publishing -------------------------------------------------------------------------------

    async def publish(
        self, base_version: int, files: Mapping[str, Any], message: str, author: str, *, rollback_of: int | None = None
    ) -> RailsVersion:
        """Raises `VersionConflict` (409) or `RailsInvalid` (422); in both cases nothing changed."""
        live_number = await self.store.live_number()
        if live_number != base_version:  # cheap early answer; the compare-and-set below is the real check
            raise VersionConflict(base_version, live_number)
        # The other replicas build the draft while this one validates it. Safe before validation: a
        # prepared guard is only swapped in once its version is live, and only valid versions go live.
        request = await self._ask_peers(files) if not check_files(files, self.limits) else None
        guard = await self._validated_guard(files, run_tests=True)
        if request is not None and self.preparation is not None:
            await self.preparation.wait(request)
        async with self._apply_lock:
            try:
                version = await self.store.publish(base_version, files, message, author, rollback_of=rollback_of)
            except BaseException:
                await _close_guard(guard)
                raise
            old = await self.live.swap(LoadedRails(version_label(version.number), guard, dict(version.files)))
        self._retire(old)
        log.info("rails version %d published by %s: %s", version.number, author, message)
        return version

    async def _ask_peers(self, files: Mapping[str, Any]) -> PeerRequest | None:
        if self.preparation is None:
            return None
        try:
            return await self.preparation.ask_peers(dict(files))
        except Exception as exc:  # an optimisation only: the followers build after the announcement instead
            log.warning("could not ask the other replicas to prepare the rails: %s", exc)
            return None

    async def rollback(self, number: int, author: str, message: str | None = None) -> RailsVersion:
        """Publishes the content of version `number` as a new version (validated again: the code that
        runs the rails may have changed since that version was live)."""
        target = await self.store.get(number)
        base = await self.store.live_number()
        return await self.publish(
            base, target.files, message or f"Rollback to version {number}", author, rollback_of=number
        )

    async def try_draft(
        self,
        files: Mapping[str, Any],
        message: str,
        *,
        answer: str | None = None,
        history: list[dict[str, str]] | None = None,
        context: list[str] | None = None,
    ) -> dict[str, Any]:
        """Runs the input rails (and the output rails on `answer`) of a draft config; publishes nothing."""
        guard = await self._validated_guard(files, run_tests=False)
        try:
            messages = [*(history or []), {"role": "user", "content": message}]
            embedding = None
            if self._embedder is not None:
                embedding = (await asyncio.to_thread(self._embedder.embed, [message]))[0]
            result: dict[str, Any] = {"input": _decision_dict(await guard.check_input(messages, embedding))}
            result["output"] = None
            if answer is not None:
                result["output"] = _decision_dict(await guard.check_output(messages, answer, context))
            return result
        finally:
            await _close_guard(guard)

    async def eval_draft(self, files: Mapping[str, Any], rows: list[Any], kind: str = "safety") -> dict[str, Any]:
        """Measures a draft config on labelled rows (block and false-refusal rates per rail and
        category) before it is published; publishes nothing."""
        from app.eval import eval_guard

        guard = await self._validated_guard(files, run_tests=False)
        try:
            report: dict[str, Any] = await eval_guard(guard, self._embedder, rows, kind=kind)
            return report
        finally:
            await _close_guard(guard)

    # --- following the store (all replicas) -------------------------------------------------------

    async def sync(self) -> bool:
        """Makes this replica serve the store's live version. True when it swapped."""
        number = await self.store.live_number()
        if number == 0 or number == _serving_number(self.live) or number == self._failed_number:
            return False
        async with self._apply_lock:
            number = await self.store.live_number()  # may have moved while we waited for the lock
            if number == 0 or number == _serving_number(self.live):
                return False
            version = await self.store.get(number)
            current = self.live.current
            try:
                # Same content (e.g. the seed of the config loaded from disk): keep the built guard; else the
                # guard built when the publishing replica staged this content, else build it now.
                guard = current.guard if current.files == version.files else await self._prepared_or_built(version)
            except Exception as exc:
                # Keep serving the old (validated) config; retry only when the live version changes.
                self._failed_number = number
                self.last_sync_error = f"version {number}: {exc}"
                log.error("cannot load live rails version %d; still serving %s: %s", number, current.version, exc)
                return False
            old = await self.live.swap(LoadedRails(version_label(number), guard, dict(version.files)))
            self._failed_number = None
            self.last_sync_error = None
        if old.guard is not guard:
            self._retire(old)
        log.info("now serving rails version %d", number)
        return True

    async def _prepared_or_built(self, version: RailsVersion) -> Guard:
        prepared = await self.preparation.take(version.sha) if self.preparation is not None else None
        return prepared if prepared is not None else await self._builder(dict(version.files))

    def _retire(self, old: LoadedRails) -> None:
        """Closes a replaced guard's clients once the turns that grabbed it before the swap are done."""
        task = asyncio.create_task(_close_guard(old.guard, delay_s=self.retire_after_s), name="rails-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @property
    def _read_timeout_s(self) -> float:
        """How long one pub/sub read waits: bounds how long `stop` waits for the listener."""
        return min(self.poll_interval_s, 1.0)

    async def start(self) -> None:
        await self.sync()
        self._stopping.clear()
        self._tasks.append(asyncio.create_task(self._follow(), name="rails-follow"))
        self._tasks.append(asyncio.create_task(self._listen(), name="rails-listen"))
        if self.preparation is not None:
            with contextlib.suppress(Exception):  # the follow loop retries the heartbeat every tick
                await self.preparation.tick()
            prepare = self.preparation.run(self._stopping, self._read_timeout_s)
            self._tasks.append(asyncio.create_task(prepare, name="rails-prepare"))

    async def stop(self) -> None:
        # The loops notice `_stopping` within one poll interval and clean up themselves (see
        # RedisChangeSubscription for why they are not simply cancelled); cancel is the fallback.
        self._stopping.set()
        self._wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self._read_timeout_s + 2.0)
            for task in pending:
                task.cancel()
        for task in [*self._tasks, *self._retiring]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.preparation is not None:
            await self.preparation.close()
        if self._owns_store:
            await self.store.close()

    async def _follow(self) -> None:
        store_down = False  # log an outage once, not every second
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                await self.sync()
                if self.preparation is not None:
                    await self.preparation.tick()
            except Exception as exc:  # the store is down: keep serving, try again next tick
                if not store_down:
                    log.warning("rails store unreachable, still serving %s: %s", self.live.current.version, exc)
                store_down = True
            else:
                if store_down:
                    log.info("rails store reachable again")
                store_down = False

    async def _listen(self) -> None:
        """Wakes `_follow` as soon as a replica announces a publish; re-subscribes after errors."""
        while not self._stopping.is_set():
            try:
                subscription = await self.store.subscribe()
            except Exception as exc:
                log.debug("rails change feed unavailable (the poll keeps running): %s", exc)
                await asyncio.sleep(self.poll_interval_s)
                continue
            if subscription is None:
                return  # this store has no push notifications: the poll alone follows it
            try:
                while not self._stopping.is_set():
                    if await subscription.next_change(self._read_timeout_s) is not None:
                        self._wake.set()
            except Exception as exc:
                log.debug("rails change feed failed (the poll keeps running): %s", exc)
                await asyncio.sleep(self.poll_interval_s)
            finally:
                with contextlib.suppress(Exception):
                    await subscription.close()


def _errors_from_exception(exc: Exception) -> list[dict[str, Any]]:
    """A builder error as `{file, line, message}` items (app.guard.loader.RailsConfigError has `.problems`)."""
    problems = getattr(exc, "problems", None)
    if problems:
        return [
            {"file": getattr(p, "file", None) or "", "line": getattr(p, "line", None), "message": str(p.message)}
            for p in problems
        ]
    return [{"file": "", "line": None, "message": str(exc) or type(exc).__name__}]


async def _close_guard(guard: Guard, delay_s: float = 0.0) -> None:
    try:
        if delay_s:
            await asyncio.sleep(delay_s)
    finally:  # also when shutdown cancels the wait: its HTTP sessions must not outlive the process's loop
        try:
            await guard.aclose()
        except Exception as exc:
            log.warning("closing a retired rails guard failed: %s", exc)


def _decision_dict(decision: GuardDecision) -> dict[str, Any]:
    return {
        "allowed": decision.allowed,
        "blocked_by": decision.blocked_by,
        "refusal": decision.refusal,
        "guard_error": decision.guard_error,
        "rails": [r.to_dict() for r in decision.rails],
    }
