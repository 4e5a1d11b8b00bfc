"""Fixtures of the gateway tests: a Redis database and a live stack shared by one test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

REDIS_BASE = os.environ.get("ECHO4O_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")


@pytest.fixture(scope="module")
def module_redis_url() -> Iterator[str]:
    """A flushed Redis database (index 1..15, picked by pid, away from the per-test one) for one module."""
    import redis

    index = 1 + ((os.getpid() + 7) % 15)
    url = f"{REDIS_BASE}/{index}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {url} ({exc}). Start it: redis-server --daemonize yes --port 6379, "
                    "or point ECHO4O_TEST_REDIS_URL at one.")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()

