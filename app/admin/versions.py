"""Versioned rails configs: immutable numbered versions plus a `live` pointer moved by compare-and-set.

Every publish (and every rollback) creates version `live + 1` and makes it live in one atomic step, so
the newest version is always the live one and two publishes made against the same base cannot both
win. Two stores implement `RailsVersionStore`: `FileRailsVersionStore` here (single host: one JSON
file per version under `data_dir/rails_versions`) and `RedisRailsVersionStore` (versions_redis.py,
shared by all replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

SEED_AUTHOR = "seed"


class VersionStoreError(Exception):
    """Base class of the rails version store's typed errors."""


class VersionConflict(VersionStoreError):
    """The publish was based on a version that is no longer live (someone published in between)."""

    def __init__(self, base_version: int, live_version: int) -> None:
        super().__init__(f"base version {base_version} is not live; version {live_version} is")
        self.base_version = base_version
        self.live_version = live_version


class VersionNotFound(VersionStoreError):
    def __init__(self, number: int) -> None:
        super().__init__(f"rails version {number} does not exist")
        self.number = number


class StoreEmpty(VersionStoreError):
    """No version was ever published (call `ensure_seeded` first)."""


@dataclass(frozen=True)
class VersionInfo:
    """A version without its files (what listings return)."""

    number: int
    author: str
    created_at: str  # ISO 8601, UTC
    message: str
    sha: str  # sha256 of the canonical JSON of the files: equal content <=> equal sha
    parent: int  # the live version this one was published on (0 for the seed)
    rollback_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "files"}


@dataclass(frozen=True)
class RailsVersion(VersionInfo):
    files: dict[str, str] = field(default_factory=dict)

    def info(self) -> VersionInfo:
        return VersionInfo(**self.to_dict())


def files_sha(files: Mapping[str, str]) -> str:
    canonical = json.dumps(dict(sorted(files.items())), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def new_version(
    number: int, parent: int, files: Mapping[str, str], message: str, author: str, rollback_of: int | None = None
) -> RailsVersion:
    return RailsVersion(
        number=number,
        author=author,
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        message=message,
        sha=files_sha(files),
        parent=parent,
        rollback_of=rollback_of,
        files=dict(sorted(files.items())),
    )


def version_from_dict(data: Mapping[str, Any]) -> RailsVersion:
    return RailsVersion(
        number=int(data["number"]),
        author=str(data["author"]),
        created_at=str(data["created_at"]),
        message=str(data["message"]),
        sha=str(data["sha"]),
        parent=int(data["parent"]),
        rollback_of=None if data.get("rollback_of") is None else int(data["rollback_of"]),
        files=dict(data.get("files") or {}),
    )


def unified_diff(old: Mapping[str, str], new: Mapping[str, str], old_label: str = "a", new_label: str = "b") -> str:
    """`git diff`-style unified diff over every file of two configs (added/removed files included)."""
    chunks: list[str] = []
    for path in sorted(set(old) | set(new)):
        before, after = old.get(path), new.get(path)
        if before == after:
            continue
        lines = difflib.unified_diff(
            _lines(before),
            _lines(after),
            fromfile=f"{old_label}/{path}" if before is not None else "/dev/null",
            tofile=f"{new_label}/{path}" if after is not None else "/dev/null",
        )
        chunks.append("".join(lines))
    return "".join(chunks)


def _lines(text: str | None) -> list[str]:
    if not text:
        return []
    lines = text.splitlines(keepends=True)
    if not lines[-1].endswith("\n"):  # keep the diff well-formed when a file lacks a final newline
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


class RailsVersionStore(Protocol):
    async def live_number(self) -> int:
        """The live version number; 0 when the store is empty. Cheap: replicas poll it."""
        ...

    async def live(self) -> RailsVersion: ...

    async def get(self, number: int) -> RailsVersion: ...

    async def list(self) -> list[VersionInfo]:
        """All versions, newest first, without their files."""
        ...

    async def publish(
        self, base_version: int, files: Mapping[str, str], message: str, author: str, *, rollback_of: int | None = None
    ) -> RailsVersion:
        """Stores `files` as version `base_version + 1` and makes it live, atomically; raises
        `VersionConflict` when `base_version` is not the live version."""
        ...

    async def ensure_seeded(self, files: Mapping[str, str], author: str = SEED_AUTHOR) -> RailsVersion:
        """Publishes `files` as version 1 when the store is empty; returns the live version."""
        ...

    async def diff(self, a: int, b: int) -> str: ...

    async def rollback(self, number: int, author: str, message: str | None = None) -> RailsVersion:
        """Publishes the content of version `number` as a NEW version on top of the live one."""
        ...

    async def subscribe(self) -> ChangeSubscription | None:
        """Push notifications of newly live version numbers, when the store has them (Redis)."""
        ...

    async def close(self) -> None: ...


class ChangeSubscription(Protocol):
    async def next_change(self, timeout_s: float) -> int | None:
        """The next newly live version number, or None when none arrived within `timeout_s`."""
        ...

    async def close(self) -> None: ...


class VersionStoreBase:
    """The store operations that are the same for every backend, written on top of the primitives."""

    async def live_number(self) -> int:
        raise NotImplementedError

    async def get(self, number: int) -> RailsVersion:
        raise NotImplementedError

    async def publish(
        self, base_version: int, files: Mapping[str, str], message: str, author: str, *, rollback_of: int | None = None
    ) -> RailsVersion:
        raise NotImplementedError

    async def live(self) -> RailsVersion:
        number = await self.live_number()
        if number == 0:
            raise StoreEmpty("no rails version has been published yet")
        return await self.get(number)

    async def ensure_seeded(self, files: Mapping[str, str], author: str = SEED_AUTHOR) -> RailsVersion:
        if await self.live_number() == 0:
            # Several replicas may seed at once: the compare-and-set lets exactly one of them win.
            with contextlib.suppress(VersionConflict):
                return await self.publish(0, files, "Initial version from the rails directory", author)
        return await self.live()

    async def diff(self, a: int, b: int) -> str:
        old, new = await self.get(a), await self.get(b)
        return unified_diff(old.files, new.files, f"v{a}", f"v{b}")

    async def rollback(self, number: int, author: str, message: str | None = None) -> RailsVersion:
        target = await self.get(number)
        base = await self.live_number()
        return await self.publish(
            base, target.files, message or f"Rollback to version {number}", author, rollback_of=number
        )

    async def subscribe(self) -> ChangeSubscription | None:
        return None

    async def close(self) -> None:
        return None


_VERSION_FILE = re.compile(r"^(\d{6,})\.json$")


class FileRailsVersionStore(VersionStoreBase):
    """One JSON file per version under `root/versions/`, the live number in `root/LIVE`.

    Files are written to a temp file and renamed into place, so a reader never sees half a version;
    the `LIVE` rename is the commit point. The compare-and-set holds an asyncio lock (this process)
    and an flock on `root/.lock` (other processes sharing the directory).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._versions_dir = root / "versions"
        self._live_file = root / "LIVE"
        self._lock_file = root / ".lock"
        self._lock = asyncio.Lock()
        self._cache: dict[int, RailsVersion] = {}  # versions are immutable, so caching them is safe
        self._versions_dir.mkdir(parents=True, exist_ok=True)

    def _version_path(self, number: int) -> Path:
        return self._versions_dir / f"{number:06d}.json"

    def _read_live(self) -> int:
        try:
            return int(self._live_file.read_text(encoding="utf-8").strip() or 0)
        except FileNotFoundError:
            return 0

    async def live_number(self) -> int:
        return await asyncio.to_thread(self._read_live)

    async def get(self, number: int) -> RailsVersion:
        if number in self._cache:
            return self._cache[number]
        # Files beyond LIVE are leftovers of a publish that crashed before its commit point.
        if number < 1 or number > await self.live_number():
            raise VersionNotFound(number)
        version = await asyncio.to_thread(self._read_version, number)
        self._cache[number] = version
        return version

    def _read_version(self, number: int) -> RailsVersion:
        try:
            return version_from_dict(json.loads(self._version_path(number).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise VersionNotFound(number) from None

    async def list(self) -> list[VersionInfo]:
        live = await self.live_number()
        numbers = []
        for entry in os.listdir(self._versions_dir):
            match = _VERSION_FILE.match(entry)
            if match and 1 <= int(match.group(1)) <= live:
                numbers.append(int(match.group(1)))
        return [(await self.get(n)).info() for n in sorted(numbers, reverse=True)]

    async def publish(
        self, base_version: int, files: Mapping[str, str], message: str, author: str, *, rollback_of: int | None = None
    ) -> RailsVersion:
        version = new_version(base_version + 1, base_version, files, message, author, rollback_of)
        async with self._lock:
            await asyncio.to_thread(self._publish_locked, version)
        self._cache[version.number] = version
        return version

    def _publish_locked(self, version: RailsVersion) -> None:
        with open(self._lock_file, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                live = self._read_live()
                if live != version.parent:
                    raise VersionConflict(version.parent, live)
                _atomic_write(self._version_path(version.number), json.dumps(asdict(version), ensure_ascii=False))
                _atomic_write(self._live_file, f"{version.number}\n")
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
