"""The sending side of the job queue: enqueue, revoke, count, ping (torch-free; nothing of ``worker/``).

The gateway uses it to hand jobs to workers, and a worker uses it to requeue jobs of a worker that died. The
job row is written first (``echo4o.db.crud.create_job``), then :func:`submit` sends its id; the Celery task id
is the job id, so a job can be revoked knowing only its id.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kombu.exceptions import BatchPublishError, OperationalError

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
    submit_many([(job_id, kind, priority)])
    log.debug("job enqueued", extra={"job_id": job_id, "queue": QUEUE_OF_KIND[kind], "priority": priority})
    return job_id


#: Pauses before the retries of a batch publish that met a connection error (then BrokerUnavailable).
SUBMIT_MANY_RETRY_S = (0.0, 0.2, 0.4)


def submit_many(jobs: Sequence[tuple[str, str, int]]) -> None:
    """Send the messages of ``jobs`` (``(job_id, kind, priority)`` each, as :func:`submit`) in one publish: with
    Redis, one pipeline of LPUSHes (a single round trip) on a pooled producer; with the embedded broker, one
    message after the other on that producer.

    A connection error retries the whole batch a few times, then raises :class:`BrokerUnavailable`. A retry may
    send a message twice when the broker died after taking part of a pipeline; workers run a job once whatever
    number of messages name it (the row's status and attempt decide), so a duplicate only costs a skip.
    """
    for _, kind, _ in jobs:
        if kind not in QUEUE_OF_KIND:
            raise ValueError(f"kind must be one of {sorted(QUEUE_OF_KIND)}, got {kind!r}")
    if not jobs:
        return
    app = get_app()
    errors = _connection_errors(app)
    last: BaseException | None = None
    for pause in SUBMIT_MANY_RETRY_S:
        if pause:
            time.sleep(pause)
        try:
            with app.producer_or_acquire() as producer, producer.batch(max_size=max(1, len(jobs))):
                for job_id, kind, priority in jobs:
                    _publish(app, producer, job_id, kind, priority)
        except errors as exc:
            last = exc
            continue
        except BatchPublishError as exc:  # the pipeline met a dead connection (Redis down or restarted): kombu
            if not isinstance(exc.__cause__, errors):  # wraps it, delivery uncertain; a retry may duplicate
                raise
            last = exc.__cause__
            continue
        log.debug("jobs enqueued", extra={"jobs": len(jobs)})
        return
    raise BrokerUnavailable(
        f"cannot reach the broker {_broker_label()} ({last}): start it or fix ECHO4O_BROKER_URL"
    ) from last


def _publish(app: Any, producer: Any, job_id: str, kind: str, priority: int) -> None:
    """The message ``send_task`` would send for the job, built by Celery's message factory and handed to the
    producer directly (send_task's routing, option merging and argument repr cost more than the publish
    itself). Sent on the default exchange with the queue as routing key: the broker puts it on that queue,
    and a redelivered message is restored there."""
    queue = QUEUE_OF_KIND[kind]
    args = [job_id]
    message = app.amqp.as_task_v2(
        job_id, TASK_OF_QUEUE[queue], args=args, kwargs={}, argsrepr=repr(args), kwargsrepr="{}",
        origin=_origin(), ignore_result=True, reply_to=app.thread_oid,
    )
    producer.publish(
        message.body, exchange="", routing_key=queue, headers=message.headers, priority=broker_priority(priority),
        serializer="json", retry=False, **message.properties,
    )


_ORIGIN: list[str] = []


def _origin() -> str:
    if not _ORIGIN:
        from celery.utils.nodenames import anon_nodename

        _ORIGIN.append(anon_nodename())
    return _ORIGIN[0]


_CONNECTION_ERRORS: dict[int, tuple[type[BaseException], ...]] = {}


def _connection_errors(app: Any) -> tuple[type[BaseException], ...]:
    """What a publish raises when the broker cannot be reached (kombu's wrapper and the transport's own)."""
    errors = _CONNECTION_ERRORS.get(id(app))
    if errors is None:
        conn = app.connection_for_write()
        try:
            errors = (OperationalError, ConnectionError, TimeoutError, *conn.connection_errors,
                      *conn.channel_errors)
        finally:
            conn.release()
        _CONNECTION_ERRORS[id(app)] = errors
    return errors


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
