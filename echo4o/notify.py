"""Job-change notifications over Redis pub/sub, shared by the worker (publishes) and the gateway (subscribes).

Where Redis is the broker, every write to a job row (a progress write, a state change) is followed by one small
``PUBLISH`` on one channel for all jobs, :func:`channel` (``echo4o:jobs:<db index>``). The message only says
*which* job changed, and to what status when the write changed it: ``{"id": "3f2c...", "status": "running"}``
(``status`` is null for a progress write). The row stays the truth: a gateway that hears a message re-reads the
row once for all its watchers of that job (backend/services/watch_hub.py), and a message that is lost (Redis
restarted, the gateway reconnecting) is made up for by the gateway's slow safety poll.

Publishing is best effort and never holds up the write it follows for long: a short socket timeout, and after a
failure no attempt for :data:`RETRY_AFTER_S` seconds. With another broker (the embedded one) nothing is
published and the gateway polls the rows of watched jobs instead.

Torch-free; the synchronous publisher is thread-safe (redis-py pools its connections).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from echo4o.logging import get_logger

log = get_logger(__name__)

CHANNEL_PREFIX = "echo4o:jobs"
#: Socket timeout of a publish: a write never waits on an unreachable Redis for longer.
PUBLISH_TIMEOUT_S = 0.5
#: After a failed publish, skip publishing for this long (the gateway's safety poll covers the gap).
RETRY_AFTER_S = 5.0


def supports(url: str | None) -> bool:
    """Whether ``url`` (a broker URL) is a Redis server notifications can go through."""
    return bool(url) and urlsplit(url).scheme in ("redis", "rediss", "unix")


def channel(url: str) -> str:
    """The channel of the jobs whose broker is ``url``. Pub/sub ignores Redis database indexes, so the index is
    in the name: two deployments on two databases of one server do not hear each other."""
    path = urlsplit(url).path.strip("/")
    db = path if path.isdigit() else "0"
    return f"{CHANNEL_PREFIX}:{db}"


def encode(job_id: str, status: str | None = None) -> bytes:
    """The message that job ``job_id`` changed (``status``: its new status, None for a progress write)."""
    return json.dumps({"id": job_id, "status": status}, separators=(",", ":")).encode()


def decode(data: bytes | str) -> tuple[str, str | None] | None:
    """``(job_id, status)`` of a message, or None when it is not one of ours."""
    try:
        msg = json.loads(data)
        job_id, status = msg["id"], msg.get("status")
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(job_id, str) or not (status is None or isinstance(status, str)):
        return None
    return job_id, status


class Publisher:
    """Publishes job changes on one Redis server; failures are logged and back off, never raised."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.channel = channel(url)
        self._client = redis.Redis.from_url(url, socket_connect_timeout=PUBLISH_TIMEOUT_S,
                                            socket_timeout=PUBLISH_TIMEOUT_S)
        self._down_until = 0.0
        #: Messages sent (for tests and figures).
        self.sent = 0

    def publish(self, job_id: str, status: str | None = None) -> bool:
        """Announce that job ``job_id`` changed; False when the message could not be sent."""
        if time.monotonic() < self._down_until:
            return False
        try:
            self._client.publish(self.channel, encode(job_id, status))
        except Exception as exc:  # noqa: BLE001 - notifications are advisory: the row is the truth
            self._down_until = time.monotonic() + RETRY_AFTER_S
            log.warning("job notification not sent; gateways fall back to their safety poll",
                        extra={"job_id": job_id, "error": str(exc), "retry_in_s": RETRY_AFTER_S})
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._client.close()


_lock = threading.Lock()
_publishers: dict[str, Publisher] = {}


def publisher(url: str | None = None) -> Publisher | None:
    """The process's publisher for ``url`` (default: the settings' broker), or None when it is not Redis."""
    if url is None:
        from echo4o.settings import get_settings

        url = get_settings().broker_url
    if not supports(url):
        return None
    assert url is not None
    with _lock:
        pub = _publishers.get(url)
        if pub is None:
            pub = _publishers[url] = Publisher(url)
        return pub


def job_changed(job_id: str, status: str | None = None) -> None:
    """Tell the gateways that job ``job_id``'s row changed (after the commit); a no-op without a Redis broker."""
    pub = publisher()
    if pub is not None:
        pub.publish(job_id, status)


async def subscribe(url: str) -> Any:
    """A ``redis.asyncio`` pub/sub subscribed to :func:`channel` of ``url`` (the subscription confirmed); read it
    with ``get_message(ignore_subscribe_messages=True, timeout=...)`` and close it with :func:`unsubscribe`."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=2, health_check_interval=30)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel(url))
        # the confirmation: from here on no message for the channel is missed
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=2.0)
            if msg is None:
                raise ConnectionError(f"no subscription confirmation from {url}")
            if msg["type"] == "subscribe":
                break
    except BaseException:
        await pubsub.aclose()
        await client.aclose()
        raise
    pubsub.echo4o_client = client  # closed with the pub/sub
    return pubsub


async def unsubscribe(pubsub: Any) -> None:
    """Close a :func:`subscribe` pub/sub and its client."""
    try:
        await pubsub.aclose()
    finally:
        await pubsub.echo4o_client.aclose()
