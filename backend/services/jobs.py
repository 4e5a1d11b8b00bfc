"""Submitting a job: resolve its model version, check the key's limits, write the queued row, enqueue it.

A multi-reference job's images are checked and stored under the new job's id before its row is written;
they are removed again when the submit fails before the row exists.

Group commit. Every submission goes through :func:`write_submissions`, which takes a batch of them: one
version lookup, the limits of each key from :class:`_LimitsLedger`, every admitted row in one INSERT and one
COMMIT, then every message in one publish (:func:`echo4o.queue.submit_many`: one Redis pipeline). A 202 is
still only answered once its row is committed and its message is at the broker. ``POST /generate`` hands its
submission to the app's :class:`SubmitBatcher`, which collects the submissions that arrive while the previous
batch is being written (or, when idle, on the event loop's next turn after the first one) and writes them as one batch
in a worker thread; the other submit paths write a batch of one. Per-item failures (unknown model version,
a limit) answer that request alone; a database failure answers every request of the batch 503
``database_unavailable``; a broker that does not answer fails the batch's rows and answers 503
``broker_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio
import sqlalchemy as sa
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy.orm import Session

from backend import uploads
from backend.auth import RATE_WINDOW_S, Principal, submit_limit_error
from backend.errors import ApiError, from_pydantic, invalid
from backend.metrics import Metrics
from backend.services import webhooks
from echo4o import queue, versions
from echo4o.db import crud, get_sessionmaker
from echo4o.db.models import Job, new_id, utcnow
from echo4o.jobs import GenerateJob, MultirefJob
from echo4o.logging import get_logger
from echo4o.settings import Settings

log = get_logger(__name__)

#: A batch holds at most this many submissions (the rest wait for the next one).
BATCH_MAX = 256
#: With no batch being written, the first submission waits this long for others before its batch starts. 0: the
#: loop's next turn (the submissions parsed in the same turn join it). Under load a batch is nearly always being
#: written, so batches form without a window; a 2 ms window cost every idle submit 2 ms and gained no measurable
#: throughput (benchmarks/serving_bench.py --only submissions, alternated runs).
BATCH_WINDOW_S = 0.0
#: A key's job counts for the limits are read from the records at most this often; in between, this
#: process adds what it admitted. A count that would refuse is always read again first.
LIMITS_REFRESH_S = 0.5


def served_versions(session: Session, settings: Settings) -> list[str]:
    """Model versions a job may name: the configured one, then the registered ones (``<name>/<version>``, see
    :mod:`echo4o.versions`); every image worker loads a registered version on demand. A version only some worker
    was started with (another ``ECHO4O_MODEL``) is not one: a worker configured otherwise could take the job."""
    return versions.known_versions(session, settings)


def resolve_model_version(session: Session, settings: Settings, requested: str | None, *, param: str) -> str:
    """The version a job runs on: ``requested`` when it is served here (422 naming ``param`` otherwise), the
    current one (the promoted version, else the configured one) when none was asked for."""
    if not requested:
        return versions.current_version(session, settings)
    known = served_versions(session, settings)
    if requested not in known:
        raise _unknown_version(param, requested, known)
    return requested


def _unknown_version(param: str, requested: str, known: list[str]) -> ApiError:
    return invalid(param, f"{param}: model {requested!r} is not served here; served: {', '.join(known)} "
                          "(GET /models)", code="unknown_model")


_SQLITE_SUBMIT_LOCK = threading.Lock()


def _submit_lock(settings: Settings) -> contextlib.AbstractContextManager[object]:
    """SQLite has one writer at a time and makes waiting writers sleep and retry; queueing this process's
    submissions on a lock instead keeps latency flat under load (and makes the limit check and the insert
    atomic within the process). PostgreSQL needs no lock."""
    if settings.database_url.startswith("sqlite"):
        return _SQLITE_SUBMIT_LOCK
    return contextlib.nullcontext()


@dataclass
class Submission:
    """One job to submit: who asks, the validated payload, its id (given when files were stored under it)."""

    principal: Principal
    payload: GenerateJob | MultirefJob
    job_id: str
    model_param: str = "model_version"

    @property
    def webhook_url(self) -> str | None:
        return getattr(self.payload, "webhook_url", None)


@dataclass
class _Counts:
    recent: int  # jobs created in the last RATE_WINDOW_S when read, plus admitted since
    active: int  # queued + running when read, plus admitted since
    read_at: float  # time.monotonic()


class _LimitsLedger:
    """Each key's job counts for its limits, without two COUNT queries per submission.

    The counts are read from the records (the source of truth, shared by every gateway process) at most every
    ``LIMITS_REFRESH_S``, and this process adds each job it admits. Between reads the figures only err high (jobs
    that ended or left the rate window still count), and a submission they would refuse is checked against a
    fresh read first, so this process never refuses wrongly. What it cannot see between reads is what other
    gateway processes admitted in that time: across processes a key may exceed its limits by that much."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, str], _Counts] = {}  # (database URL, owner)

    def clear(self) -> None:
        self._owners.clear()

    def _read(self, session: Session, settings: Settings, owner: str) -> _Counts:
        counts = _Counts(
            recent=crud.count_recent_jobs(session=session, owner=owner, seconds=RATE_WINDOW_S),
            active=crud.count_active_jobs(session=session, owner=owner),
            read_at=time.monotonic(),
        )
        self._owners[settings.database_url, owner] = counts
        return counts

    def admit(self, session: Session, settings: Settings, owner: str, fresh: set[str]) -> ApiError | None:
        """Count one more job for ``owner``, or the 429 that refuses it. ``fresh``: owners read in this batch."""
        counts = self._owners.get((settings.database_url, owner))
        if counts is None or time.monotonic() - counts.read_at > LIMITS_REFRESH_S:
            counts, _ = self._read(session, settings, owner), fresh.add(owner)
        error = submit_limit_error(settings, counts.recent, counts.active)
        if error is not None and owner not in fresh:
            counts, _ = self._read(session, settings, owner), fresh.add(owner)
            error = submit_limit_error(settings, counts.recent, counts.active)
        if error is None:
            counts.recent += 1
            counts.active += 1
        return error


_LEDGER = _LimitsLedger()
#: One batch is admitted and inserted at a time in this process (the ledger's counts stay exact within it).
_BATCH_LOCK = threading.Lock()


def _database_error(exc: BaseException) -> ApiError:
    log.error("submit: cannot write the job records", extra={"error": f"{type(exc).__name__}: {exc}"})
    return ApiError(503, "the job database is busy or unreachable, so the job was not recorded; retry shortly (see "
                         "Retry-After). If it persists, check ECHO4O_DATABASE_URL and that the database is up",
                    code="database_unavailable", headers={"Retry-After": "1"})


def _job_row(sub: Submission, model_version: str) -> dict[str, Any]:
    """The queued row of ``sub``, every column given (as :func:`echo4o.db.crud.create_job` writes it)."""
    now = utcnow()
    return {
        "id": sub.job_id, "kind": sub.payload.kind, "owner": sub.principal.owner,
        "params": sub.payload.model_dump(mode="json"), "model_version": model_version,
        "priority": sub.payload.priority, "status": "queued", "progress_stage": "queued", "progress_step": 0,
        "cancel_requested": False, "attempts": 0, "parent_id": None, "created_at": now, "updated_at": now,
    }


def _admit_and_insert(
    session: Session, settings: Settings, subs: list[Submission], outcomes: list[Job | ApiError | None]
) -> list[int]:
    """Decide each pending submission (version, limits), insert the admitted rows in one transaction and
    commit; the indexes of the admitted ones."""
    current: str | None = None
    known: list[str] | None = None
    rows: dict[int, dict[str, Any]] = {}
    fresh: set[str] = set()
    for i, sub in enumerate(subs):
        if outcomes[i] is not None:
            continue
        requested = sub.payload.model_version
        if requested:
            known = known if known is not None else served_versions(session, settings)
            if requested not in known:
                outcomes[i] = _unknown_version(sub.model_param, requested, known)
                continue
            version = requested
        else:
            current = current if current is not None else versions.current_version(session, settings)
            version = current
        refused = _LEDGER.admit(session, settings, sub.principal.owner, fresh)
        if refused is not None:
            outcomes[i] = refused
            continue
        rows[i] = _job_row(sub, version)
    if rows:
        session.execute(sa.insert(Job), list(rows.values()))
    session.commit()
    for i, row in rows.items():
        outcomes[i] = Job(**row)
    return list(rows)


def write_submissions(settings: Settings, metrics: Metrics, subs: list[Submission]) -> list[Job | ApiError]:
    """Submit ``subs`` as one batch (blocking: call it from a worker thread); for each, its queued job (row
    committed, message at the broker) or the error that refused it."""
    outcomes: list[Job | ApiError | None] = [None] * len(subs)
    for i, sub in enumerate(subs):  # may resolve the host: before any lock
        if sub.webhook_url:
            try:
                webhooks.check_url(settings, sub.webhook_url)  # webhooks: 422 before any row exists
            except ApiError as exc:
                outcomes[i] = exc
    session = get_sessionmaker(settings.database_url)()
    try:
        try:
            with _BATCH_LOCK, _submit_lock(settings):
                admitted = _admit_and_insert(session, settings, subs, outcomes)
        except sa.exc.SQLAlchemyError as exc:
            session.rollback()
            _LEDGER.clear()  # it counted jobs that were not written
            error = _database_error(exc)
            return [error if out is None else out for out in outcomes]
        for i in admitted:
            url = subs[i].webhook_url
            if url:  # webhooks: the delivery row, written before the job can run (let alone end)
                job = outcomes[i]
                try:
                    webhooks.register(session, settings, job.id, job.owner, url)  # type: ignore[union-attr]
                except sa.exc.SQLAlchemyError as exc:
                    session.rollback()
                    outcomes[i] = _database_error(exc)
                    _fail_quietly(session, job.id, "database_unavailable", str(exc))  # type: ignore[union-attr]
        jobs = [out for out in outcomes if isinstance(out, Job)]
        try:
            queue.submit_many([(job.id, job.kind, job.priority) for job in jobs])
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, no row may stay queued without a message
            message = str(exc) if isinstance(exc, queue.BrokerUnavailable) else (
                f"the broker did not take the jobs ({type(exc).__name__}: {exc}); retry, and check the broker "
                "(ECHO4O_BROKER_URL) if it persists")
            log.error("enqueue failed", extra={"jobs": [job.id for job in jobs], "error": message})
            for job in jobs:  # a worker skips a failed job, should its message have got through after all
                _fail_quietly(session, job.id, "broker_unavailable", message)
            error = ApiError(503, message, code="broker_unavailable")
            return [error if isinstance(out, Job) else out for out in outcomes]  # type: ignore[misc]
    finally:
        session.close()
    kinds: dict[str, int] = {}
    for job in jobs:
        kinds[job.kind] = kinds.get(job.kind, 0) + 1
    for kind, n in kinds.items():
        metrics.jobs_submitted.labels(kind=kind).inc(n)
    if len(jobs) == 1:
        job = jobs[0]
        log.info("job submitted", extra={"job_id": job.id, "kind": job.kind, "owner": job.owner,
                                         "priority": job.priority, "pid": os.getpid()})
    elif jobs and log.isEnabledFor(logging.INFO):  # one line per batch: a line per job costs the batch thread
        log.info("job submitted", extra={"jobs": len(jobs), "job_ids": " ".join(job.id for job in jobs),
                                         "owners": " ".join(sorted({job.owner for job in jobs})), "pid": os.getpid()})
    return outcomes  # type: ignore[return-value]


def _fail_quietly(session: Session, job_id: str, code: str, message: str) -> None:
    """Fail a recorded job whose message could not be sent (best effort: the database may be what failed)."""
    try:
        crud.mark_failed(session=session, job_id=job_id, code=code, message=message)
    except sa.exc.SQLAlchemyError as exc:
        session.rollback()
        log.error("submit: cannot fail the job either", extra={"job_id": job_id, "error": str(exc)})


def submit_job(
    session: Session,
    settings: Settings,
    metrics: Metrics,
    principal: Principal,
    payload: GenerateJob | MultirefJob,
    *,
    job_id: str | None = None,
    model_param: str = "model_version",
) -> Job:
    """Check limits, write the queued row, enqueue it (a batch of one; blocking). A broker that does not answer
    fails the job (503). ``session`` is unused: the batch writes with its own."""
    del session
    (outcome,) = write_submissions(settings, metrics, [Submission(principal, payload, job_id or new_id(),
                                                                  model_param)])
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


class SubmitBatcher:
    """Group commit of one app's ``POST /generate`` submissions on its event loop.

    A submission waits on a future. With no batch being written, the first one schedules a batch
    ``BATCH_WINDOW_S`` later (the loop's next turn; at once when ``BATCH_MAX`` are waiting); while a batch is
    written (in a worker thread, :func:`write_submissions`), the next ones gather and go as the next batch as soon
    as it ends. So a busy gateway writes as many as arrived during one batch in one transaction and one publish.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[Submission, asyncio.Future[Job | ApiError]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    async def submit(self, sub: Submission) -> Job:
        """The queued job of ``sub`` once its batch is written; raises the ApiError that refused it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (a test client per request): nothing of the old one is pending
            self._loop, self._pending, self._timer, self._writing = loop, [], None, None
        future: asyncio.Future[Job | ApiError] = loop.create_future()
        self._pending.append((sub, future))
        if self._writing is None:
            if len(self._pending) >= BATCH_MAX:
                self._start()
            elif self._timer is None:
                self._timer = loop.call_later(BATCH_WINDOW_S, self._start)
        outcome = await future
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None or not self._pending or self._loop is None:
            return
        batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
        self._writing = self._loop.create_task(self._write(batch))

    async def _write(self, batch: list[tuple[Submission, asyncio.Future[Job | ApiError]]]) -> None:
        try:
            try:
                outcomes: list[Any] = await anyio.to_thread.run_sync(
                    write_submissions, self.settings, self.metrics, [sub for sub, _ in batch]
                )
            except asyncio.CancelledError:  # shutting down
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - a bug: every waiting request hears of it, none hangs
                outcomes = [exc] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(outcome, Exception) and not isinstance(outcome, ApiError):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._writing = None
        if self._pending:  # they waited for this batch already
            self._start()


def submit_batched(app: FastAPI, sub: Submission) -> Any:
    """Await the queued job of ``sub`` through ``app``'s batcher (made on first use)."""
    batcher = getattr(app.state, "submit_batcher", None)
    if batcher is None:
        batcher = app.state.submit_batcher = SubmitBatcher(app.state.settings, app.state.metrics)
    return batcher.submit(sub)


def validate_multiref_fields(fields: dict[str, Any], n_images: int) -> MultirefJob:
    """Validate the non-image fields with the job model (placeholder references, replaced once stored)."""
    if "references" in fields:
        raise invalid("references", "references: not accepted from clients; send the images themselves "
                                    "(`images` files or base64 strings)")
    try:
        return MultirefJob.model_validate({**fields, "references": [f"pending/{i}.png" for i in range(n_images)]})
    except ValidationError as exc:
        raise from_pydantic(exc) from None


def submit_multiref(
    session: Session,
    settings: Settings,
    metrics: Metrics,
    principal: Principal,
    fields: dict[str, Any],
    raw_images: list[uploads.RawImage],
    *,
    images_param: str = "images",
    model_param: str = "model_version",
) -> Job:
    """Validate fields and images, store the images under the new job's id, submit it."""
    if len(raw_images) > settings.max_references:
        uploads.checked_images(settings, raw_images, param=images_param)  # raises, naming the count
    payload = validate_multiref_fields(fields, max(1, len(raw_images)))
    images = uploads.checked_images(settings, raw_images, param=images_param)
    job_id = new_id()
    refs = uploads.save_references(images, data_dir=settings.data_dir, job_id=job_id)
    try:
        payload = payload.model_copy(update={"references": refs})
        return submit_job(session, settings, metrics, principal, payload, job_id=job_id, model_param=model_param)
    except BaseException:
        if crud.get_job(session=session, job_id=job_id) is None:
            uploads.discard_references(data_dir=settings.data_dir, job_id=job_id)
        raise
