"""The Celery application, built from settings: broker, queues, task names, priorities (torch-free).

Both sides use this one configuration: the gateway sends jobs through it (:mod:`echo4o.queue`), the worker
runs them (:mod:`worker.celery_app` registers the worker's tasks on it). Tasks are addressed by name
(:data:`TASK_IMAGE`, :data:`TASK_TRAIN`), so sending one needs nothing of ``worker/``.

Two brokers:

* ``ECHO4O_BROKER_URL=redis://...``: Redis broker and result backend. Late acks plus Redis's visibility
  timeout (``broker_visibility_timeout_s``, above ``job_timeout_s``) hand the job of a worker that died to
  another one; priorities use one Redis list per level (``queue_order_strategy=priority``).
* empty (the default): an embedded broker that needs no server, kombu's SQLAlchemy transport on
  ``<data_dir>/broker.sqlite`` (WAL, busy timeout, 0.1 s polling), and a SQLite result backend. Chosen
  because it is the only kombu transport that several processes can share through a file. Its limits,
  checked by the tests: a message counts as delivered when a worker takes it (kombu's virtual transport
  acks in memory), so a SIGKILLed embedded worker's job is recovered from the job records at the next
  worker start (``worker.runtime.recover_orphans``), not by the broker; no priorities; meant for one
  worker next to the gateway.
"""

from __future__ import annotations

import threading
from typing import Any

import kombu.transport
from celery import Celery
from kombu import Exchange, Queue
from kombu.transport import sqlalchemy as kombu_sqla

from echo4o.jobs import DEFAULT_PRIORITY, MAX_PRIORITY, QUEUE_OF_KIND
from echo4o.settings import Settings, get_settings

TASK_IMAGE = "echo4o.run_image_job"
TASK_TRAIN = "echo4o.run_train_job"
#: The Celery queues, in the order of first appearance in ``QUEUE_OF_KIND`` (gpu, train).
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(QUEUE_OF_KIND.values()))
#: The task that runs the jobs of each queue.
TASK_OF_QUEUE: dict[str, str] = {"gpu": TASK_IMAGE, "train": TASK_TRAIN}
#: Priority levels at the broker: one per job priority 0..MAX_PRIORITY.
PRIORITY_LEVELS = MAX_PRIORITY + 1
EMBEDDED_SCHEME = "echo4osqla"
EMBEDDED_POLL_S = 0.1


class EmbeddedTransport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport tuned for a SQLite file shared by the gateway and one worker."""

    polling_interval = EMBEDDED_POLL_S

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.polling_interval = EMBEDDED_POLL_S


class _EmbeddedChannel(kombu_sqla.Channel):
    def _engine_from_config(self):  # noqa: ANN202 - kombu's signature
        import sqlalchemy as sa

        from echo4o.db.session import SQLITE_BUSY_TIMEOUT_S, _set_sqlite_pragmas

        url = self.connection.client.hostname
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})
        sa.event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine


EmbeddedTransport.Channel = _EmbeddedChannel
kombu.transport.TRANSPORT_ALIASES[EMBEDDED_SCHEME] = f"{__name__}:EmbeddedTransport"


def broker_priority(priority: int) -> int:
    """Job priority (0..MAX_PRIORITY, highest first) to the broker's scale: Redis delivers its priority 0 first.
    Out-of-range values are clamped."""
    return MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))


def broker_urls(settings: Settings) -> tuple[str, str]:
    """(broker, result backend) URLs for these settings."""
    if settings.broker_url:
        return settings.broker_url, settings.result_backend_url or settings.broker_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker = f"{EMBEDDED_SCHEME}+sqlite:///{settings.data_dir / 'broker.sqlite'}"
    backend = settings.result_backend_url or f"db+sqlite:///{settings.data_dir / 'celery-results.sqlite'}"
    return broker, backend


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: the process settings), with no tasks registered:
    the gateway only sends by name; the worker registers its tasks (:func:`worker.celery_app.get_app`)."""
    settings = settings or get_settings()
    broker, backend = broker_urls(settings)
    app = Celery("echo4o", broker=broker, backend=backend, set_as_current=True)
    vt = settings.broker_visibility_timeout_s
    if settings.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        transport_options: dict[str, Any] = {
            "visibility_timeout": vt,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": ":",
            # scan for abandoned (unacked, older than the visibility timeout) messages at least this often
            "unacked_restore_interval": max(1, min(60, vt // 4)),
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
        }
        backend_options: dict[str, Any] = {"socket_timeout": 30, "socket_connect_timeout": 5}
    else:
        transport_options = {}
        backend_options = {}
    app.conf.update(
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name,
                  queue_arguments={"x-max-priority": PRIORITY_LEVELS})
            for name in QUEUES
        ],
        task_default_queue=QUEUES[0],
        task_routes={task: {"queue": queue} for queue, task in TASK_OF_QUEUE.items()},
        task_default_priority=broker_priority(DEFAULT_PRIORITY),
        task_queue_max_priority=PRIORITY_LEVELS,
        # a job is acknowledged only when it has finished; if the worker dies first the broker hands it on
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        result_backend_transport_options=backend_options,
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        result_extended=False,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=False,
        task_time_limit=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=True,
        broker_heartbeat=0,
    )
    return app


_lock = threading.Lock()
_apps: dict[tuple[str, str, int], Celery] = {}


def get_app() -> Celery:
    """The Celery app for the current settings (rebuilt when the broker settings change, as in tests)."""
    settings = get_settings()
    broker, backend = broker_urls(settings)
    key = (broker, backend, settings.broker_visibility_timeout_s)
    with _lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = create_celery(settings)
        return app
