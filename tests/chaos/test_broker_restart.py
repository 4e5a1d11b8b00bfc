"""The gateway's enqueue after Redis restarted: its pooled connection to the old server is dead, and the next
publish must reconnect and send (or, with Redis still down, answer 503 broker_unavailable), never raise
something the gateway turns into a 500. Found by the chaos suite (tests/chaos/test_no_job_lost.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from echo4o import queue
from echo4o.settings import get_settings
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.chaos


def test_enqueue_after_redis_restart_reconnects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        monkeypatch.setenv("ECHO4O_BROKER_URL", redis.url)
        get_settings.cache_clear()
        queue.submit_many([("job-before", "generate", 5)])  # the producer's pooled connection now exists
        redis.restart()  # SIGKILL, then the same port and append-only file: that connection is dead

        queue.submit_many([("job-after", "generate", 5)])

        assert queue.queue_depth("gpu") == 2  # the first survived in the append-only file, the second was sent
        redis.kill()
        with pytest.raises(queue.BrokerUnavailable, match="cannot reach the broker"):
            queue.submit_many([("job-down", "generate", 5)])
    finally:
        redis.stop()
