"""Knowledge shared by every replica: uploads and deletions made through one replica reach the others.

Each replica keeps its own index (DATA_DIR), so nothing on the search path changes. Redis holds what
replicas must agree on, under `<GUARDCHAT_REDIS_KEY_PREFIX>{knowledge}:` (the `{knowledge}` hash tag puts them
in one Redis Cluster slot, which a MULTI/EXEC over several of them needs):
  version          -> a counter, moved by every change
  files            -> hash {"uploads/<name>": sha256 of the content} of the uploaded files
  file:<relpath>   -> the uploaded file's bytes
  deleted          -> set of document ids deleted through the API or the console (uploads and shipped ones)
  events           -> pub/sub channel; the new version is published on every change
A change is one MULTI/EXEC transaction (write, move `version`, PUBLISH), so it is stored and announced
together. Every replica follows like the rails (app/admin/publisher.py): woken by the channel, and polling
`version` every second in case a message was lost. When the version moved it reconciles: it writes every
uploaded file whose local copy is missing or differs and ingests exactly those, and deletes the documents
in `deleted` that its index still has. Reconciling is idempotent, so a missed or repeated event costs
nothing, and a new replica catches up on its first sync. Files only this replica has (e.g. uploaded while
Redis was down) are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from app.rag.chunking import document_identity
from app.rag.loaders import SUPPORTED_SUFFIXES
from app.redis_client import AsyncRedisClient, redis_client
from app.state import AppState

log = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"
# What an uploaded file may be called (both upload paths produce such names): no directories, no hidden files.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


class SharedKnowledgeUnavailable(Exception):
    """The change was made on this replica only: the shared store (Redis) could not be written."""


def upload_relpath(path: Path, knowledge_dir: Path) -> str | None:
    """`uploads/<name>` for a file directly in the uploads dir, else None (shipped documents are not shared:
    every replica has them from its image)."""
    try:
        rel = PurePosixPath(Path(path).resolve().relative_to(Path(knowledge_dir).resolve()).as_posix())
    except ValueError:
        return None
    return str(rel) if is_upload_relpath(str(rel)) else None


def is_upload_relpath(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return (
        len(parts) == 2
        and parts[0] == UPLOADS_DIR
        and _SAFE_NAME.fullmatch(parts[1]) is not None
        and PurePosixPath(parts[1]).suffix.lower() in SUPPORTED_SUFFIXES
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class SyncPlan:
    """What one reconcile changes on this replica."""

    version: int
    write: dict[str, bytes] = field(default_factory=dict)  # relpath -> content to store locally
    ingest: list[Path] = field(default_factory=list)  # local files to (re)ingest
    delete_ids: list[str] = field(default_factory=list)  # documents to drop from the index
    remove: list[Path] = field(default_factory=list)  # deleted uploads' files (a re-index would bring them back)


# (paths, delete_ids) -> None: ingests/deletes on this replica (runs in a worker thread)
ApplyChanges = Callable[[list[Path], list[str]], Any]


class SharedKnowledge:
    def __init__(
        self,
        redis: AsyncRedisClient,
        prefix: str,
        knowledge_dir: Path,
        *,
        documents: Callable[[], Mapping[str, Mapping[str, Any]]],
        apply_changes: ApplyChanges,
        lock: asyncio.Lock,
        poll_interval_s: float = 1.0,
        owns_client: bool = False,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.knowledge_dir = Path(knowledge_dir)
        self.poll_interval_s = poll_interval_s
        self.channel = f"{prefix}events"
        self.applied_version = 0
        self.last_sync_error: str | None = None
        self._documents = documents  # the live index's manifest: document id -> entry
        self._apply_changes = apply_changes
        self._lock = lock
        self._owns_client = owns_client
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # --- publishing (the replica that took the request; the caller holds the lock) -----------------

    async def publish_uploads(self, paths: Iterable[Path]) -> int:
        """Shares files this replica just ingested. Raises SharedKnowledgeUnavailable when Redis fails."""
        shared = {rel: Path(p) for p in paths if (rel := upload_relpath(Path(p), self.knowledge_dir))}
        files = await asyncio.to_thread(lambda: {rel: path.read_bytes() for rel, path in shared.items()})
        if not files:
            return self.applied_version

        def changes(pipe: Any) -> None:
            for rel, data in files.items():
                pipe.set(self._key(f"file:{rel}"), data)
                pipe.hset(self._key("files"), rel, _sha256(data))
                pipe.srem(self._key("deleted"), document_identity(self.knowledge_dir / rel, self.knowledge_dir)[0])

        return await self._commit(changes)

    async def publish_deletion(self, document_id: str, path: Path | None) -> int:
        """Shares a deletion this replica just made (`path`: the document's file, if it was an upload)."""
        rel = upload_relpath(path, self.knowledge_dir) if path is not None else None

        def changes(pipe: Any) -> None:
            if rel is not None:
                pipe.delete(self._key(f"file:{rel}"))
                pipe.hdel(self._key("files"), rel)
            pipe.sadd(self._key("deleted"), document_id)

        return await self._commit(changes)

    async def _commit(self, changes: Callable[[Any], None]) -> int:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                changes(pipe)
                pipe.incr(self._key("version"))
                results = await pipe.execute()
                version = int(results[-1])
                await self.redis.publish(self.channel, version)
        except Exception as exc:
            raise SharedKnowledgeUnavailable(f"the shared knowledge store is unavailable: {exc}") from exc
        return version

    # --- following (every replica) -----------------------------------------------------------------

    async def sync(self) -> bool:
        """Brings this replica's uploads and index in line with the shared store. True when it changed."""
        raw = await self.redis.get(self._key("version"))
        if raw is None or int(_text(raw)) == self.applied_version:
            return False
        async with self._lock:
            plan = await self._plan()
            if plan is None:
                return False
            changed = bool(plan.ingest or plan.delete_ids)
            if changed:
                await asyncio.to_thread(self._apply, plan)
            self.applied_version = plan.version
        if changed:  # (a replica's own publish comes back as a version with nothing to do)
            log.info(
                "knowledge version %d: %d file(s) ingested, %d document(s) deleted",
                plan.version,
                len(plan.ingest),
                len(plan.delete_ids),
            )
        return changed

    def _apply(self, plan: SyncPlan) -> None:
        for rel, data in plan.write.items():
            _atomic_write(self.knowledge_dir / rel, data)
        for path in plan.remove:
            path.unlink(missing_ok=True)
        self._apply_changes(plan.ingest, plan.delete_ids)

    async def resync(self) -> bool:
        """Reconciles even if the version did not move (after a local full re-index)."""
        self.applied_version = -1
        return await self.sync()

    async def _plan(self) -> SyncPlan | None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self._key("version"))
            pipe.hgetall(self._key("files"))
            pipe.smembers(self._key("deleted"))
            raw_version, raw_files, raw_deleted = await pipe.execute()
        version = int(_text(raw_version or 0))
        if version == self.applied_version:
            return None
        plan = SyncPlan(version)
        indexed = self._documents()
        wanted = {_text(k): _text(v) for k, v in raw_files.items()}
        for rel in [rel for rel in wanted if not is_upload_relpath(rel)]:
            log.warning("ignoring a shared knowledge file with an unsafe name: %r", rel)
            del wanted[rel]
        local_shas = await asyncio.to_thread(self._local_shas, wanted)
        fetch = []
        for rel, sha in sorted(wanted.items()):
            local = self.knowledge_dir / rel
            if local_shas.get(rel) != sha:
                fetch.append(rel)
            elif document_identity(local, self.knowledge_dir)[0] not in indexed:
                plan.ingest.append(local)  # stored here but not indexed (e.g. a fresh index)
        if fetch:
            contents = await self.redis.mget([self._key(f"file:{rel}") for rel in fetch])
            for rel, data in zip(fetch, contents, strict=True):
                if data is not None:  # None: deleted since; the next version says so
                    plan.write[rel] = data if isinstance(data, bytes) else str(data).encode("utf-8")
                    plan.ingest.append(self.knowledge_dir / rel)
        plan.delete_ids = sorted(_text(d) for d in raw_deleted if _text(d) in indexed)
        for doc_id in plan.delete_ids:
            path = Path(str(indexed[doc_id].get("path", "")))
            if upload_relpath(path, self.knowledge_dir):
                plan.remove.append(path)
        return plan

    def _local_shas(self, rels: Iterable[str]) -> dict[str, str]:
        """sha256 of this replica's copy of each uploaded file it has."""
        return {rel: _sha256(path.read_bytes()) for rel in rels if (path := self.knowledge_dir / rel).is_file()}

    async def start(self) -> None:
        try:
            await self.sync()
        except Exception as exc:  # Redis down at start: serve what this replica has, catch up later
            self.last_sync_error = str(exc)
            log.warning("shared knowledge not synced at start: %s", exc)
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._follow(), name="knowledge-follow"),
            asyncio.create_task(self._listen(), name="knowledge-listen"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.poll_interval_s + 2.0)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._tasks = []
        if self._owns_client:
            await self.redis.aclose()

    async def _follow(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                await self.sync()
                self.last_sync_error = None
            except Exception as exc:  # Redis down or an ingest error: keep serving, retry next tick
                if self.last_sync_error is None:
                    log.warning("shared knowledge sync failed (retrying every %.0f s): %s", self.poll_interval_s, exc)
                self.last_sync_error = str(exc)

    async def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
            except Exception as exc:
                log.debug("knowledge change feed unavailable (the poll keeps running): %s", exc)
                await asyncio.sleep(self.poll_interval_s)
                continue
            try:
                while not self._stopping.is_set():
                    timeout = min(self.poll_interval_s, 1.0)
                    if await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout):
                        self._wake.set()
            except Exception as exc:
                log.debug("knowledge change feed failed (the poll keeps running): %s", exc)
                await asyncio.sleep(self.poll_interval_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def apply_with_ingest(settings: Any, embedder: Any, reload: Callable[[], Any]) -> ApplyChanges:
    """The real `apply_changes`: app/rag/ingest.py on exactly these files and ids, then the retriever reload."""

    def apply(paths: Sequence[Path], delete_ids: Sequence[str]) -> None:
        from app.rag.ingest import ingest

        report = ingest(
            list(paths), settings, embedder=embedder, delete_ids=list(delete_ids), progress=False, prune=False
        )
        for failed in report.errors:
            log.error("shared knowledge: %s could not be applied here: %s", failed.document_id, failed.message)
        reload()

    return apply


def index_documents(state: AppState) -> dict[str, dict[str, Any]]:
    """The live index's manifest: document id -> entry (with the server path of its file)."""
    if state.retriever is not None:
        docs: dict[str, dict[str, Any]] = state.retriever.snapshot.documents
        return docs
    from app.rag.index import load_snapshot

    return load_snapshot(state.settings.index_dir, gpu=False).documents


async def start_shared_knowledge(state: AppState) -> SharedKnowledge | None:
    """With Redis and RAG on: catches this replica up with the shared knowledge, follows it, and registers it
    in `state.shared_knowledge` (the upload and delete paths publish through it). Stop it with
    `await shared.stop()` at shutdown."""
    settings = state.settings
    if not settings.redis_url or state.retriever is None:
        return None
    reload = state.retriever.reload
    shared = SharedKnowledge(
        redis_client(settings.redis_url),
        f"{settings.redis_key_prefix}{{knowledge}}:",
        settings.knowledge_dir,
        documents=lambda: index_documents(state),
        apply_changes=apply_with_ingest(settings, state.embedder, reload),
        lock=state.ingest_lock,
        poll_interval_s=settings.rails_poll_interval_s,
        owns_client=True,
    )
    await shared.start()
    state.shared_knowledge = shared
    return shared
