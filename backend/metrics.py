"""Prometheus metrics of one gateway process (``GET /metrics``).

* ``echo4o_jobs{status}`` and ``echo4o_queue_depth``: read from the job records at scrape time, so every
  gateway replica reports the same global figures.
* ``echo4o_job_latency_seconds{kind,status}`` (submit to end), ``echo4o_job_phase_seconds{phase}`` (the
  worker's recorded timings: queue wait, sampling, encoding, ...) and ``echo4o_step_seconds`` (sampling time
  per denoising step): observed, at scrape time, for the jobs that ended since the previous scrape.
* ``echo4o_http_request_duration_seconds{method,route,status}`` and ``echo4o_jobs_submitted_total{kind}``:
  this process's own traffic.

Each app gets its own registry, so several apps in one process (tests) do not collide.

With several gateway processes (``ECHO4O_GATEWAY_PROCESSES`` > 1) ``echo4o serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before they start (:data:`MULTIPROC_ENV`): each process keeps its
counters and histograms there (prometheus_client's multiprocess mode) and a scrape of any of them answers the sum
over all, so a scraper that reaches one process at random sees one steady series. The jobs that ended are then
observed once for all processes: the scraped process advances one shared cursor, under a file lock, in that folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from echo4o.db import crud, get_sessionmaker
from echo4o.db.models import TERMINAL_STATUSES, Job, utcnow
from echo4o.files import write_atomic
from echo4o.logging import get_logger

log = get_logger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SCAN_LIMIT = 5000  # ended jobs read per scrape at most; the rest are read at the next one
#: Set (by ``echo4o serve``, before the gateway processes start) to the folder their metrics share.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_CURSOR_FILE = "echo4o-ended-jobs.json"


def multiprocess_dir() -> str | None:
    """The folder the gateway processes share their metrics in, or None for a process of its own."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_latency = Histogram(
            "echo4o_http_request_duration_seconds", "Time to answer an HTTP request (SSE: the whole stream).",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "echo4o_jobs_submitted", "Jobs this gateway accepted.", ["kind"], registry=self.registry
        )
        self.job_latency = Histogram(
            "echo4o_job_latency_seconds", "Submit to end of jobs that ended.", ["kind", "status"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.job_phase = Histogram(
            "echo4o_job_phase_seconds", "Phases recorded by the worker for succeeded jobs.", ["phase"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.step_time = Histogram(
            "echo4o_step_seconds", "Sampling time per denoising step of succeeded jobs.", buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.job_row_reads = Counter(
            "echo4o_job_row_reads", "Job rows read for watchers (event streams, ?wait) by this process's watch hub: "
            "one read per change of a watched job, however many watch it.", registry=self.registry,
        )
        self._http_children: dict[tuple[str, str, int], Any] = {}  # labelled children, looked up once each
        self._lock = threading.Lock()
        self._since: datetime = utcnow()
        self._seen_at_since: set[str] = set()
        self.registry.register(_RecordsCollector(self))

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP latency observation (the labelled child is bound on first use: ``labels()`` costs more
        than the observation)."""
        child = self._http_children.get((method, route, status))
        if child is None:
            child = self._http_children[method, route, status] = self.http_latency.labels(
                method=method, route=route, status=str(status))
        child.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text for a scrape: ended jobs observed first, so they show in this very scrape. With
        several gateway processes, the sum of all their counters and histograms."""
        try:
            self.observe_ended_jobs()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: cannot read ended jobs", extra={"error": str(exc)})
        shared = multiprocess_dir()
        if shared is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=shared)
        registry.register(_RecordsCollector(self))
        return generate_latest(registry)

    def observe_ended_jobs(self) -> None:
        """Feed the histograms with the jobs that ended since the last call (of any gateway process, when several
        share their metrics)."""
        with self._lock, self._shared_cursor():
            session = get_sessionmaker(self.database_url)()
            try:
                rows = session.scalars(
                    sa.select(Job)
                    .where(Job.status.in_(TERMINAL_STATUSES), Job.finished_at >= self._since)
                    .order_by(Job.finished_at, Job.id)
                    .limit(SCAN_LIMIT)
                ).all()
            finally:
                session.close()
            for job in rows:
                if job.finished_at == self._since and job.id in self._seen_at_since:
                    continue
                self._observe(job)
                if job.finished_at != self._since:
                    self._since, self._seen_at_since = job.finished_at, set()
                self._seen_at_since.add(job.id)

    @contextlib.contextmanager
    def _shared_cursor(self) -> Iterator[None]:
        """With several gateway processes: hold the folder's lock and take the shared cursor (which ended jobs
        were observed already), storing it back on the way out; alone: nothing to share."""
        shared = multiprocess_dir()
        if shared is None:
            yield
            return
        cursor = os.path.join(shared, _CURSOR_FILE)
        with open(os.path.join(shared, _CURSOR_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
                    with open(cursor) as f:
                        saved = json.load(f)
                    self._since = datetime.fromisoformat(saved["since"])
                    self._seen_at_since = set(saved["seen"])
                yield
                write_atomic(cursor, json.dumps({"since": self._since.isoformat(),
                                                 "seen": sorted(self._seen_at_since)}).encode())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _observe(self, job: Job) -> None:
        if job.finished_at and job.created_at:
            self.job_latency.labels(kind=job.kind, status=job.status).observe(
                max(0.0, (job.finished_at - job.created_at).total_seconds())
            )
        if job.status != "succeeded" or not job.result:
            return
        timings = job.result.get("timings") or {}
        for phase, value in timings.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.job_phase.labels(phase=phase.removesuffix("_s")).observe(max(0.0, float(value)))
        sampling = timings.get("sampling_s")
        # denoising steps actually run (the engine's total), else the requested schedule length
        steps = job.progress_total or (job.params or {}).get("num_steps")
        if isinstance(sampling, int | float) and isinstance(steps, int) and steps > 0:
            self.step_time.observe(max(0.0, float(sampling)) / steps)


class _RecordsCollector(Collector):
    """Gauges read from the job records at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("echo4o_jobs", "Jobs in the records by status.", labels=["status"])
        yield GaugeMetricFamily("echo4o_queue_depth", "Jobs queued (not yet running).")
        yield GaugeMetricFamily("echo4o_workers_ready", "Workers with the model loaded and a fresh heartbeat.")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            session = get_sessionmaker(self.metrics.database_url)()
            try:
                counts = crud.count_jobs_by_status(session=session)
                ready = len(crud.list_ready_workers(session=session))
            finally:
                session.close()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: cannot read the job records", extra={"error": str(exc)})
            return
        jobs = GaugeMetricFamily("echo4o_jobs", "Jobs in the records by status.", labels=["status"])
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily("echo4o_queue_depth", "Jobs queued (not yet running).", value=counts.get("queued", 0))
        yield GaugeMetricFamily("echo4o_workers_ready", "Workers with the model loaded and a fresh heartbeat.",
                                value=ready)


class HttpMetricsMiddleware:
    """Pure ASGI (streams pass through untouched): one latency observation per HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_http(scope["method"], path, status, time.perf_counter() - start)
