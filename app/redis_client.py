"""Every Redis client of the app comes from here, so `GUARDCHAT_REDIS_URL` means the same thing everywhere.

URL forms:
  redis://[[user]:password@]host[:port][/db]          one Redis (redis-py's own URL syntax, query options too)
  rediss://...                                        the same over TLS
  unix://[[user]:password@]/path/to/socket[?db=N]     a local socket
  redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<service>[/db][?sentinel_password=...]
      the primary of `<service>` as Sentinel names it; the sentinels (default port 26379) are asked for the
      primary on every new connection, so after a failover the clients reconnect to the new one. The password
      is the data nodes'; `sentinel_password` is for sentinels that have their own `requirepass`.
  redis+cluster://[[user]:password@]host[:port][,host[:port]...]
      a Redis Cluster; the hosts are seeds (default port 6379), the client learns the rest. Database 0 only.

`parse_redis_url` checks a URL without connecting (settings use it, so a bad URL stops the server at start
with one line instead of a traceback); `redis_client` builds the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, overload
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as redis_async
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel

__all__ = [
    "AsyncRedisClient",
    "RedisTarget",
    "RedisURLError",
    "SyncRedisClient",
    "is_current_primary",
    "parse_redis_url",
    "redis_client",
]

log = logging.getLogger(__name__)

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SINGLE_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379
URL_FORMS = (
    "redis://host:port/db, rediss://..., unix:///path, "
    "redis+sentinel://[password@]host:port[,host:port]/<service>[/db], redis+cluster://host:port[,host:port]"
)

# A call site that passes no `retry` gets this: a dropped connection (a primary that failed over or restarted)
# is retried at most 3 times within about a second. Only connection errors: after a timeout the command may
# have run, and running a write twice is the caller's decision. redis-py's default is 10 tries on timeouts too.
RETRY_ATTEMPTS = 3
RETRY_BACKOFF = {"base": 0.05, "cap": 0.5}

AsyncRedisClient = redis_async.Redis | redis_async.RedisCluster
SyncRedisClient = redis.Redis | redis.RedisCluster


# How often a Sentinel-backed pool asks a sentinel who the primary is, while it is in use. redis-py asks only when
# it opens a connection, and a primary that was failed over by hand (SENTINEL FAILOVER) keeps accepting writes on
# the connections it has until Sentinel demotes it, about 10 s later: writes that are then lost (measured: every
# write of those 10 s). Asking every half second moves every connection to the new primary within that.
PRIMARY_RECHECK_S = 0.5


class _FencedSentinelPool(AsyncSentinelConnectionPool):
    """A Sentinel pool that re-asks for the primary every PRIMARY_RECHECK_S and drops connections to any other."""

    _checked_at = float("-inf")

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        now = time.monotonic()
        if self.is_master and now - self._checked_at >= PRIMARY_RECHECK_S:
            self._checked_at = now
            # Updates master_address and closes idle connections to an old primary. Sentinels all down: keep going
            # with the connections we have (the data nodes may still be fine).
            with contextlib.suppress(RedisConnectionError, redis.TimeoutError):
                await self.get_master_address()
        connection = await super().get_connection(command_name, *keys, **options)
        address = (connection.host, connection.port)
        if self.is_master and self.master_address is not None and address != self.master_address:
            log.info("redis: leaving the old primary %s:%s for %s:%s", *address, *self.master_address)
            await connection.disconnect()
            await connection.connect()  # asks the sentinels again
        return connection


async def is_current_primary(client: Any, address: tuple[str, int], *, settle_s: float = 5.0) -> bool | None:
    """With a Sentinel URL: whether every sentinel that answers names `address` as the primary, with no failover
    under way. A failover in progress is waited out (up to `settle_s`): the replica is promoted before the
    sentinels name it, so "still named" alone would wrongly keep a write made in that gap. False when no
    sentinel answers or the wait runs out. None for other URLs: there is no one to ask."""
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, AsyncSentinelConnectionPool):
        return None
    sentinels = pool.sentinel_manager.sentinels
    deadline = time.monotonic() + settle_s
    while True:
        answers = await asyncio.gather(
            *(sentinel.sentinel_master(pool.service_name) for sentinel in sentinels), return_exceptions=True
        )
        states = [answer for answer in answers if isinstance(answer, dict)]
        if not states or any((str(s["ip"]), int(s["port"])) != tuple(address) for s in states):
            return False
        if not any(_failing_over(state) for state in states):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


def _failing_over(state: dict[str, Any]) -> bool:
    flags = state.get("flags", "")
    names = set(flags) if isinstance(flags, set) else set(str(flags).split(","))
    return bool(names & {"failover_in_progress", "s_down", "o_down"})


class _AsyncSentinelPrimary(redis_async.Redis):
    """The primary's client that also closes its sentinels' connections when it is closed."""

    owned_sentinel: AsyncSentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.owned_sentinel is not None:
            await self.owned_sentinel.aclose()


class _SentinelPrimary(redis.Redis):
    owned_sentinel: Sentinel | None = None

    def close(self) -> None:
        super().close()
        if self.owned_sentinel is not None:
            self.owned_sentinel.close()


class RedisURLError(ValueError):
    """A Redis URL the app cannot use. The message never contains the password."""


@dataclass(frozen=True)
class RedisTarget:
    """What a URL points at. `nodes` are the sentinels (sentinel) or the seed nodes (cluster)."""

    kind: Literal["single", "sentinel", "cluster"]
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


async def subscribed(client: Any, channel: str) -> Any:
    """A pubsub (subscribe confirmations skipped) already subscribed to `channel`; closed again if subscribing
    fails, so a follower that retries does not leak connections."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
    except BaseException:
        await pubsub.aclose()
        raise
    return pubsub


def parse_redis_url(url: str) -> RedisTarget:
    """The target of `url`, or RedisURLError saying what is wrong (and which forms exist)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SINGLE_SCHEMES:
        try:
            redis.connection.parse_url(url)
        except ValueError as exc:
            raise RedisURLError(f"not a valid {scheme}:// URL ({_without_secrets(str(exc), url)})") from None
        return RedisTarget("single", url)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise RedisURLError(f"unknown Redis URL scheme {scheme or '(none)'!r}; use one of: {URL_FORMS}")
    rest = url.split("://", 1)[1]
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "?" in netloc:  # no path at all: redis+cluster://h:p?x=y
        netloc, _, query = netloc.partition("?")
    userinfo, _, hosts = netloc.rpartition("@")
    username, password = _credentials(userinfo)
    default_port = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_REDIS_PORT
    nodes = tuple(_host_port(part, default_port) for part in hosts.split(","))
    options = _query(query, allowed={"sentinel_password"} if scheme == SENTINEL_SCHEME else set())
    segments = [segment for segment in path.split("/") if segment]
    if scheme == CLUSTER_SCHEME:
        if segments not in ([], ["0"]):
            raise RedisURLError("a redis+cluster:// URL takes no path: Redis Cluster has database 0 only")
        return RedisTarget("cluster", url, nodes, username=username, password=password)
    if not 1 <= len(segments) <= 2:
        raise RedisURLError("a redis+sentinel:// URL needs the service name as its path: .../<service>[/db]")
    return RedisTarget(
        "sentinel",
        url,
        nodes,
        service_name=unquote(segments[0]),
        db=_db(segments[1]) if len(segments) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=options.get("sentinel_password"),
    )


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if has_password else None)


def _host_port(part: str, default_port: int) -> tuple[str, int]:
    part = part.strip()
    if part.startswith("["):  # [IPv6]:port
        host, _, after = part[1:].partition("]")
        port_text = after.removeprefix(":")
    elif part.count(":") == 1:
        host, _, port_text = part.partition(":")
    else:
        host, port_text = part, ""
    if not host:
        raise RedisURLError("a host in the URL is empty (hosts are separated by commas: host:port,host:port)")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisURLError(f"host {host!r} has an invalid port {port_text!r}")
    return host, int(port_text)


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisURLError(f"the database must be a number, got {text!r}")
    return int(text)


def _query(query: str, *, allowed: set[str]) -> dict[str, str]:
    values = parse_qs(query, keep_blank_values=True) if query else {}
    unknown = sorted(set(values) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise RedisURLError(f"unknown URL option(s) {', '.join(unknown)} (accepted: {accepted})")
    return {name: items[-1] for name, items in values.items()}


def _without_secrets(message: str, url: str) -> str:
    password = urlsplit(url).password if "@" in url else None
    return message.replace(password, "***") if password else message


def _as_set(response: Any, **_options: Any) -> set[Any]:
    return set(response) if response else set()


@overload
def redis_client(
    url: str, *, decode_responses: bool = ..., async_: Literal[True] = ..., **options: Any
) -> AsyncRedisClient: ...


@overload
def redis_client(
    url: str, *, decode_responses: bool = ..., async_: Literal[False], **options: Any
) -> SyncRedisClient: ...


def redis_client(
    url: str, *, decode_responses: bool = False, async_: bool = True, **options: Any
) -> AsyncRedisClient | SyncRedisClient:
    """A client (redis-py asyncio, or sync with `async_=False`) for any URL form above. `options` are redis-py
    connection options (socket timeouts, retry, health_check_interval...); with Sentinel the socket timeouts
    also bound each question to a sentinel, so a dead sentinel costs at most that long."""
    target = parse_redis_url(url)
    options["decode_responses"] = decode_responses
    if "retry" not in options:
        retry_class = AsyncRetry if async_ else Retry
        backoff = ExponentialWithJitterBackoff(**RETRY_BACKOFF)
        options["retry"] = retry_class(backoff, RETRY_ATTEMPTS, supported_errors=(RedisConnectionError,))
    if target.kind == "single":
        return (redis_async.Redis if async_ else redis.Redis).from_url(url, **options)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        if async_:
            seeds = [AsyncClusterNode(host, port) for host, port in target.nodes]
            cluster = redis_async.RedisCluster(startup_nodes=seeds, **auth, **options)
            # redis-py 8.1: in an async cluster MULTI/EXEC these replies' callbacks are called with `keys=` and
            # raise TypeError (app/rag/shared_knowledge.py reads SMEMBERS in one).
            for command in ("SDIFF", "SINTER", "SMEMBERS", "SUNION"):
                cluster.set_response_callback(command, _as_set)
            return cluster
        return redis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes], **auth, **options
        )
    sentinel_options = {key: value for key, value in options.items() if key.startswith("socket_")}
    if target.sentinel_password is not None:
        sentinel_options["password"] = target.sentinel_password
    service = str(target.service_name)
    if async_:
        async_sentinel = AsyncSentinel(list(target.nodes), sentinel_kwargs=sentinel_options)
        primary = async_sentinel.master_for(
            service, _AsyncSentinelPrimary, _FencedSentinelPool, db=target.db, **auth, **options
        )
        primary.owned_sentinel = async_sentinel
        return primary
    sync_sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options)
    sync_primary = sync_sentinel.master_for(service, _SentinelPrimary, db=target.db, **auth, **options)
    sync_primary.owned_sentinel = sync_sentinel
    return sync_primary
