"""The rails version store shared by all replicas: Redis.

Keys (under `prefix`, e.g. "guardchat:{rails}:"; the `{rails}` hash tag keeps them in one Redis Cluster slot,
which the publish script needs):
  live          -> the live version number
  meta          -> hash {number: JSON of VersionInfo}  (listings never load files)
  files:<n>     -> JSON {path: content} of version n
  events        -> pub/sub channel; the new live number is published on every publish
A Lua script does the compare-and-set, the writes and the PUBLISH in one atomic step, so a version
exists, is live and is announced together or not at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from redis.asyncio.client import PubSub

from app.admin.versions import (
    RailsVersion,
    VersionConflict,
    VersionInfo,
    VersionNotFound,
    VersionStoreBase,
    new_version,
    version_from_dict,
)
from app.redis_client import AsyncRedisClient, subscribed

log = logging.getLogger(__name__)

# KEYS: live, meta, files:<base+1>   ARGV: base, meta json, files json, channel
_PUBLISH_LUA = """
local live = tonumber(redis.call('GET', KEYS[1]) or '0')
if live ~= tonumber(ARGV[1]) then
  return {0, live}
end
local new = live + 1
redis.call('SET', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[2], tostring(new), ARGV[2])
redis.call('SET', KEYS[1], new)
redis.call('PUBLISH', ARGV[4], new)
return {1, new}
"""


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisChangeSubscription:
    """Reads with a timeout instead of being cancelled mid-read: cancelling a pub/sub read and then
    closing the PubSub can hang in redis-py, so the follower stops by simply not asking again."""

    def __init__(self, pubsub: PubSub, channel: str) -> None:
        self._pubsub = pubsub
        self._channel = channel

    async def next_change(self, timeout_s: float) -> int | None:
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        if not message or message.get("type") != "message":
            return None
        try:
            return int(_text(message["data"]))
        except ValueError:
            log.warning("ignoring a malformed rails event on %s", self._channel)
            return None

    async def close(self) -> None:
        await self._pubsub.aclose()


class RedisRailsVersionStore(VersionStoreBase):
    def __init__(
        self, redis: AsyncRedisClient, prefix: str = "guardchat:{rails}:", *, owns_client: bool = False
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.channel = f"{prefix}events"
        self._live_key = f"{prefix}live"
        self._meta_key = f"{prefix}meta"
        self._owns_client = owns_client
        self._publish_script = redis.register_script(_PUBLISH_LUA)
        self._cache: dict[int, RailsVersion] = {}  # versions are immutable, so caching them is safe

    def _files_key(self, number: int) -> str:
        return f"{self.prefix}files:{number}"

    async def live_number(self) -> int:
        raw = await self.redis.get(self._live_key)
        return int(_text(raw)) if raw is not None else 0

    async def get(self, number: int) -> RailsVersion:
        if number in self._cache:
            return self._cache[number]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._meta_key, str(number))
            pipe.get(self._files_key(number))
            meta_raw, files_raw = await pipe.execute()
        if meta_raw is None or files_raw is None:
            raise VersionNotFound(number)
        data = json.loads(_text(meta_raw))
        data["files"] = json.loads(_text(files_raw))
        version = version_from_dict(data)
        self._cache[number] = version
        return version

    async def list(self) -> list[VersionInfo]:
        raw = await self.redis.hgetall(self._meta_key)
        infos = [version_from_dict(json.loads(_text(v))).info() for v in raw.values()]
        return sorted(infos, key=lambda info: info.number, reverse=True)

    async def publish(
        self, base_version: int, files: Mapping[str, str], message: str, author: str, *, rollback_of: int | None = None
    ) -> RailsVersion:
        version = new_version(base_version + 1, base_version, files, message, author, rollback_of)
        meta = json.dumps(version.to_dict(), ensure_ascii=False)
        files_json = json.dumps(version.files, ensure_ascii=False)
        ok, number = await self._publish_script(
            keys=[self._live_key, self._meta_key, self._files_key(version.number)],
            args=[base_version, meta, files_json, self.channel],
        )
        if not int(ok):
            raise VersionConflict(base_version, int(number))
        self._cache[version.number] = version
        return version

    async def subscribe(self) -> RedisChangeSubscription:
        return RedisChangeSubscription(await subscribed(self.redis, self.channel), self.channel)

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
