"""Fixtures of the gateway tests: Redis databases private to one test module."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

REDIS_BASE = os.environ.get("ECHO4O_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")


@pytest.fixture(scope="module")
def module_redis_urls() -> Iterator[Callable[[int], str]]:
    """``url(n)``: the n-th flushed Redis database of this module (indexes 1..15, from the pid, away from the
    per-test ``redis_url``). Two stacks alive at once need two: they would take each other's jobs."""
    import redis

    clients: list[redis.Redis] = []

    def url(n: int = 0) -> str:
        index = 1 + ((os.getpid() + 7 + n) % 15)
        address = f"{REDIS_BASE}/{index}"
        client = redis.Redis.from_url(address, socket_connect_timeout=2)
        try:
            client.ping()
        except redis.RedisError as exc:
            pytest.fail(f"Redis is not reachable at {address} ({exc}). Start it: redis-server --daemonize yes "
                        "--port 6379, or point ECHO4O_TEST_REDIS_URL at one.")
        client.flushdb()
        clients.append(client)
        return address

    yield url
    for client in clients:
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def module_redis_url(module_redis_urls: Callable[[int], str]) -> str:
    """One flushed Redis database for this module."""
    return module_redis_urls(0)
