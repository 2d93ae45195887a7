"""The Redis URL forms (app/redis_client.py): what each means, and a clear error (no password) for bad ones."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from app.redis_client import RedisURLError, parse_redis_url, redis_client
from app.settings import Settings


def test_sentinel_url_names_sentinels_service_db_and_passwords() -> None:
    target = parse_redis_url("redis+sentinel://:p%40ss@s1:26380,s2,[::1]:26381/mymaster/2?sentinel_password=sp")
    assert target.kind == "sentinel"
    assert target.nodes == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (target.service_name, target.db, target.password, target.sentinel_password) == ("mymaster", 2, "p@ss", "sp")


def test_cluster_url_names_seed_nodes() -> None:
    target = parse_redis_url("redis+cluster://user:pw@n1:7000,n2")
    assert (target.kind, target.nodes, target.username, target.password) == (
        "cluster",
        (("n1", 7000), ("n2", 6379)),
        "user",
        "pw",
    )


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://:pw@h:6380/1", "unix:///tmp/redis.sock?db=1"])
def test_single_server_urls_keep_redis_py_syntax(url: str) -> None:
    assert parse_redis_url(url).kind == "single"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://:secret@h:6379", "unknown Redis URL scheme"),
        ("redis+sentinel://:secret@h:26379", "service name"),
        ("redis+sentinel://:secret@h:26379/mymaster/x", "database must be a number"),
        ("redis+sentinel://:secret@h:99999/mymaster", "invalid port"),
        ("redis+sentinel://:secret@h/mymaster?retries=3", "unknown URL option"),
        ("redis+cluster://:secret@h:7000/2", "database 0 only"),
        ("redis+cluster://:secret@,h:7000", "empty"),
        ("redis://:secret@h:port/0", "not a valid redis://"),
    ],
)
def test_bad_urls_say_why_without_the_password(url: str, reason: str) -> None:
    with pytest.raises(RedisURLError) as caught:
        parse_redis_url(url)
    assert reason in str(caught.value) and "secret" not in str(caught.value)
    with pytest.raises(ValidationError) as invalid:  # the same check stops the server at start
        Settings(redis_url=url)
    assert reason in str(invalid.value)


async def test_clients_for_each_form() -> None:
    sentinel = redis_client("redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster")
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)  # type: ignore[union-attr]
    cluster = redis_client("redis+cluster://127.0.0.1:1")
    assert isinstance(cluster, RedisCluster)
    await sentinel.aclose()
    await cluster.aclose()
