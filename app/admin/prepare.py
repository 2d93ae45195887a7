"""Build before announcing: a replica that publishes rails asks every other replica to build the new
guard first, and moves the live pointer only once they have (or a bounded wait is over). The other
replicas then swap the moment the publish is announced, instead of starting a build that costs seconds
on a busy 2-core machine.

Redis layout (under the rails prefix, e.g. "guardchat:{rails}:"):
  replicas          -> sorted set {replica id: last heartbeat (unix s)}; who the publisher waits for
  staged:<sha>      -> JSON {path: content} of a validated draft (expires after STAGED_TTL_S)
  prepared:<sha>    -> hash {replica id: "ok" | "error: ..."} (expires after STAGED_TTL_S)
  prepare           -> pub/sub channel; JSON {"sha", "origin"} when a draft is staged
The sha is `files_sha(files)`, the same as the published version's, so a follower finds the guard it
prepared by the version's sha. Everything here is an optimisation: when Redis misses a message, a replica
is slow or runs older code, followers simply build after the announcement as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from redis.asyncio.client import PubSub

from app.admin.versions import files_sha
from app.guard.base import Guard
from app.redis_client import AsyncRedisClient, subscribed

log = logging.getLogger(__name__)

STAGED_TTL_S = 600
GuardBuild = Callable[[dict[str, str]], Awaitable[Guard]]


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def new_replica_id() -> str:
    """Readable in logs (host, pid) and unique even when pids repeat across containers."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisPrepareChannel:
    """The Redis side: heartbeats, staged drafts, acks and the `prepare` channel."""

    def __init__(
        self,
        redis: AsyncRedisClient,
        prefix: str,
        replica_id: str | None = None,
        *,
        heartbeat_window_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.replica_id = replica_id or new_replica_id()
        self.heartbeat_window_s = heartbeat_window_s  # a replica silent for longer is not waited for
        self.channel = f"{prefix}prepare"
        self._replicas_key = f"{prefix}replicas"

    async def _now(self) -> float:
        """Redis's clock, not this host's: replicas on hosts whose clocks differ still agree who is alive."""
        seconds, microseconds = await self.redis.time()
        return float(seconds) + float(microseconds) / 1e6

    async def heartbeat(self) -> None:
        now = await self._now()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._replicas_key, {self.replica_id: now})
            pipe.zremrangebyscore(self._replicas_key, "-inf", now - 10 * self.heartbeat_window_s)
            await pipe.execute()

    async def leave(self) -> None:
        await self.redis.zrem(self._replicas_key, self.replica_id)

    async def peers(self) -> set[str]:
        """The other replicas that sent a heartbeat within the window."""
        since = await self._now() - self.heartbeat_window_s
        members = await self.redis.zrangebyscore(self._replicas_key, since, "+inf")
        return {_text(m) for m in members} - {self.replica_id}

    async def stage(self, files: Mapping[str, str]) -> str:
        sha = files_sha(files)
        # Two calls, not one pipeline: a Redis Cluster pipeline refuses PUBLISH. The draft is stored first.
        await self.redis.set(f"{self.prefix}staged:{sha}", json.dumps(dict(files), ensure_ascii=False), ex=STAGED_TTL_S)
        await self.redis.publish(self.channel, json.dumps({"sha": sha, "origin": self.replica_id}))
        return sha

    async def staged_files(self, sha: str) -> dict[str, str] | None:
        raw = await self.redis.get(f"{self.prefix}staged:{sha}")
        return None if raw is None else dict(json.loads(_text(raw)))

    async def ack(self, sha: str, outcome: str) -> None:
        key = f"{self.prefix}prepared:{sha}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, self.replica_id, outcome)
            pipe.expire(key, STAGED_TTL_S)
            await pipe.execute()

    async def acks(self, sha: str) -> dict[str, str]:
        raw = await self.redis.hgetall(f"{self.prefix}prepared:{sha}")
        return {_text(k): _text(v) for k, v in raw.items()}

    async def subscribe(self) -> PubSub:
        pubsub: PubSub = await subscribed(self.redis, self.channel)
        return pubsub


@dataclass
class PeerRequest:
    sha: str
    peers: set[str]


class Preparation:
    """Both halves of build-before-announce for one replica: `ask_peers` + `wait` on the publishing side,
    `run` (build what others stage, then ack) + `take` on the following side."""

    def __init__(
        self, channel: RedisPrepareChannel, build: GuardBuild, *, timeout_s: float = 10.0, keep_s: float = 120.0
    ) -> None:
        self.channel = channel
        self.timeout_s = timeout_s  # the longest a publish waits for the other replicas' builds
        self.keep_s = keep_s  # a prepared guard whose version never went live is closed after this
        self._build = build
        self._builds: dict[str, tuple[float, asyncio.Task[Guard]]] = {}

    # --- publishing replica -----------------------------------------------------------------------

    async def ask_peers(self, files: Mapping[str, str]) -> PeerRequest | None:
        """Stages `files` and asks the live replicas to build them. None when no one else is there."""
        peers = await self.channel.peers()
        if not peers:
            return None
        return PeerRequest(await self.channel.stage(files), peers)

    async def wait(self, request: PeerRequest, poll_s: float = 0.02) -> dict[str, str]:
        """Waits until every asked replica acked (built or failed), at most `timeout_s`."""
        deadline = time.monotonic() + self.timeout_s
        acks: dict[str, str] = {}
        while time.monotonic() < deadline:
            acks = await self.channel.acks(request.sha)
            if request.peers <= acks.keys():
                break
            await asyncio.sleep(poll_s)
        missing = request.peers - acks.keys()
        failed = {peer: outcome for peer, outcome in acks.items() if outcome != "ok"}
        if missing:
            log.warning(
                "publishing rails before %d replica(s) built them (waited %.0f s)", len(missing), self.timeout_s
            )
        if failed:
            log.warning("replica(s) could not build the new rails, they keep their config: %s", failed)
        return acks

    # --- following replicas -----------------------------------------------------------------------

    async def take(self, sha: str) -> Guard | None:
        """The guard prepared for `sha` (waiting for its build if it is still running), or None."""
        entry = self._builds.pop(sha, None)
        if entry is None:
            return None
        try:
            return await entry[1]
        except Exception:
            return None  # its failure was logged and acked; the caller builds (and reports) it again

    async def run(self, stopping: asyncio.Event, read_timeout_s: float = 1.0) -> None:
        """Builds every draft another replica stages, until `stopping`; re-subscribes after errors."""
        while not stopping.is_set():
            try:
                pubsub = await self.channel.subscribe()
            except Exception as exc:
                log.debug("rails prepare channel unavailable: %s", exc)
                await asyncio.sleep(read_timeout_s)
                continue
            try:
                while not stopping.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=read_timeout_s)
                    if message and message.get("type") == "message":
                        self._on_request(_text(message["data"]))
            except Exception as exc:
                log.debug("rails prepare channel failed: %s", exc)
                await asyncio.sleep(read_timeout_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_request(self, data: str) -> None:
        try:
            request = json.loads(data)
            sha, origin = str(request["sha"]), str(request["origin"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed rails prepare request")
            return
        if origin == self.channel.replica_id or sha in self._builds:
            return
        task = asyncio.create_task(self._prepare(sha), name=f"rails-prepare-{sha[:8]}")
        self._builds[sha] = (time.monotonic(), task)

    async def _prepare(self, sha: str) -> Guard:
        try:
            files = await self.channel.staged_files(sha)
            if files is None:
                raise LookupError("the staged rails expired before this replica read them")
            guard = await self._build(files)
        except Exception as exc:  # e.g. an invalid draft: the publishing replica refuses it after validation
            log.warning("cannot prepare staged rails %s: %s", sha[:12], exc)
            with contextlib.suppress(Exception):
                await self.channel.ack(sha, f"error: {exc}")
            raise
        await self.channel.ack(sha, "ok")
        return guard

    async def tick(self) -> None:
        """Heartbeat, and close prepared guards whose version never went live (e.g. a lost CAS)."""
        await self.channel.heartbeat()
        now = time.monotonic()
        for sha, (started, task) in list(self._builds.items()):
            if task.done() and now - started > self.keep_s:
                del self._builds[sha]
                await _close_unused(task)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.channel.leave()
        builds, self._builds = self._builds, {}
        for _, task in builds.values():
            task.cancel()
            await _close_unused(task)


async def _close_unused(task: asyncio.Task[Guard]) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        guard = await task
        await guard.aclose()
