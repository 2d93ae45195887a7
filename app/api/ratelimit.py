"""Per-key rate limiting with the `limits` library (moving window).

The counters live in Redis when `redis_url` is set, so every replica draws from the same budget; else in
process memory. When Redis cannot be reached the limiter keeps limiting from memory (per replica) instead
of failing requests: a Redis outage must not take down stateless turns and /v1/checks, and it must not
switch limiting off either.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.redis_client import parse_redis_url, redis_client

log = logging.getLogger(__name__)

# Short timeouts and one immediate reconnect: an outage or a failover falls back to memory at once.
REDIS_OPTIONS: dict[str, Any] = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}

# How long the limiter stays on memory after a Redis failure before it tries Redis again; keeps a dead Redis
# from costing every request a connect timeout.
REDIS_RETRY_AFTER_S = 2.0


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: str = ""
    retry_after_s: int = 0


def parse_rate_limit(value: str) -> list[RateLimitItem]:
    """'60/minute' (or several, '5/second;100/minute') -> limits items. Raises ValueError when malformed."""
    try:
        items = parse_many(value)
    except ValueError as exc:
        raise ValueError(f"invalid GUARDCHAT_RATE_LIMIT {value!r}: {exc}") from exc
    if not items:
        raise ValueError(f"invalid GUARDCHAT_RATE_LIMIT {value!r}")
    return items


class KeyRateLimiter:
    """`check(identity)` counts one request for `identity` against every configured limit."""

    def __init__(self, limit: str, *, redis_url: str | None = None, key_prefix: str = "guardchat:") -> None:
        self.items = parse_rate_limit(limit)
        self._memory = MovingWindowRateLimiter(MemoryStorage())
        self._redis_storage: Storage | None = None
        self._redis: MovingWindowRateLimiter | None = None
        self._client: Any = None
        if redis_url:
            # Each limit is one key, read and written by one script: any Redis Cluster slot will do.
            self._redis_storage = self._open_storage(redis_url, f"{key_prefix}ratelimit")
            self._redis = MovingWindowRateLimiter(self._redis_storage)
        self._redis_failed_at: float | None = None

    def _open_storage(self, redis_url: str, key_prefix: str) -> Storage:
        """limits' Redis storage (redis-py, already a dependency) on a client from app/redis_client.py; limits
        builds Redis Cluster clients itself, so those get the URL in its own syntax."""
        target = parse_redis_url(redis_url)
        if target.kind == "cluster":
            auth = ""
            if target.password is not None:
                auth = f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"
            hosts = ",".join(f"{host}:{port}" for host, port in target.nodes)
            uri = f"async+redis+cluster://{auth}{hosts}"
            return RedisClusterStorage(uri, implementation="redispy", key_prefix=key_prefix, **REDIS_OPTIONS)
        retry = Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))
        self._client = redis_client(redis_url, retry=retry, **REDIS_OPTIONS)
        pool = self._client.connection_pool  # a Sentinel pool follows the primary through a failover
        return RedisStorage("async+redis://", implementation="redispy", key_prefix=key_prefix, connection_pool=pool)

    @property
    def shared(self) -> bool:
        """True while counters are kept in Redis (shared by replicas)."""
        return self._redis is not None and self._redis_failed_at is None

    def _pick(self) -> MovingWindowRateLimiter:
        if self._redis is None:
            return self._memory
        if self._redis_failed_at is not None and time.monotonic() - self._redis_failed_at < REDIS_RETRY_AFTER_S:
            return self._memory
        return self._redis

    async def check(self, identity: str) -> RateDecision:
        limiter = self._pick()
        try:
            return await self._check_with(limiter, identity)
        except Exception as exc:  # any storage failure: limit from memory instead of failing the request
            if limiter is self._memory:
                raise
            if self._redis_failed_at is None:
                log.warning("rate limit store unavailable (%s); limiting per replica from memory", type(exc).__name__)
            self._redis_failed_at = time.monotonic()
            return await self._check_with(self._memory, identity)

    async def _check_with(self, limiter: MovingWindowRateLimiter, identity: str) -> RateDecision:
        for item in self.items:
            if not await limiter.hit(item, identity):
                stats = await limiter.get_window_stats(item, identity)
                retry = max(1, math.ceil(stats.reset_time - time.time()))
                return RateDecision(False, str(item), retry)
        if limiter is self._redis and self._redis_failed_at is not None:
            log.info("rate limit store is back; limits are shared again")
            self._redis_failed_at = None
        return RateDecision(True)

    async def aclose(self) -> None:
        if self._client is not None:  # the storage's own client does not close a pool it was given
            try:
                await self._client.aclose()
            except Exception:  # best effort at shutdown
                log.debug("closing the rate limit store failed", exc_info=True)
            return
        storage = self._redis_storage
        bridge = getattr(storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        if client is not None and hasattr(client, "aclose"):
            try:
                await client.aclose()
            except Exception:  # best effort at shutdown
                log.debug("closing the rate limit store failed", exc_info=True)
