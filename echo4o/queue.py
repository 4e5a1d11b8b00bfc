"""The sending side of the job queue: enqueue, revoke, count, ping (torch-free; nothing of ``worker/``).

The gateway uses it to hand jobs to workers, and a worker uses it to requeue jobs of a worker that died. The
job row is written first (``echo4o.db.crud.create_job``), then :func:`submit` sends its id; the Celery task id
is the job id, so a job can be revoked knowing only its id.
"""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError

from echo4o.celery_app import TASK_OF_QUEUE, broker_priority, get_app
from echo4o.jobs import DEFAULT_PRIORITY, QUEUE_OF_KIND
from echo4o.logging import get_logger
from echo4o.settings import mask_url_password

log = get_logger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached; the message says which one and how to fix it."""


def _broker_label() -> str:
    return mask_url_password(get_app().conf.broker_url or "")


def submit(job_id: str, kind: str, priority: int = DEFAULT_PRIORITY) -> str:
    """Send job ``job_id`` of ``kind`` to its queue; returns the task id (== the job id).

    ``priority`` is the job's 0..MAX_PRIORITY (highest runs first). Raises :class:`BrokerUnavailable` when
    the broker cannot be reached (after a few quick retries).
    """
    try:
        queue = QUEUE_OF_KIND[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {sorted(QUEUE_OF_KIND)}, got {kind!r}") from None
    app = get_app()
    try:
        app.send_task(
            TASK_OF_QUEUE[queue],
            args=[job_id],
            task_id=job_id,
            queue=queue,
            routing_key=queue,
            priority=broker_priority(priority),
            # nothing reads a task's result (the job row is the record), and waiting for one would subscribe
            # to the result backend, which retries for ~20 s and then raises RuntimeError when Redis is down
            ignore_result=True,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        )
    except (OperationalError, *app.connection_for_write().connection_errors) as exc:  # kombu wraps after retries
        raise BrokerUnavailable(
            f"cannot reach the broker {_broker_label()} ({exc}): start it or fix ECHO4O_BROKER_URL"
        ) from exc
    log.debug("job enqueued", extra={"job_id": job_id, "queue": queue, "priority": priority})
    return job_id


def revoke(task_id: str) -> None:
    """Tell workers to discard ``task_id`` if it reaches them (best effort: a queued job is also
    cancelled in its row, which a worker checks before running it)."""
    try:
        get_app().control.revoke(task_id)
    except Exception as exc:  # noqa: BLE001 - the row's cancel flag is what guarantees the cancel
        log.warning("revoke broadcast failed", extra={"task_id": task_id, "error": str(exc)})


def queue_depth(queue: str) -> int:
    """Messages waiting in ``queue`` (one of :data:`echo4o.celery_app.QUEUES`) at the broker, all priority
    levels together."""
    app = get_app()
    with app.connection_for_read() as conn:
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count


def ping_broker(timeout_s: float = 2.0) -> dict[str, Any]:
    """Check that the broker answers; raises :class:`BrokerUnavailable` naming it when it does not."""
    app = get_app()
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
            return {"broker": _broker_label(), "transport": conn.transport_cls}
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        raise BrokerUnavailable(
            f"cannot reach the broker {_broker_label()} ({exc}): start it or fix ECHO4O_BROKER_URL"
        ) from exc
