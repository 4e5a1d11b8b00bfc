"""Record operations. Keyword-only, no HTTP types; each write commits. State changes are single
conditional UPDATEs, so two processes (gateway cancelling, worker finishing) never overwrite each other:
a call that finds the row in a state where the change does not apply returns False instead."""

from __future__ import annotations

import functools
import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from echo4o import notify
from echo4o.db.models import ANONYMOUS, GONE_WORKER_STATUSES, ApiKey, Job, Worker, new_id, utcnow
from echo4o.jobs import (
    ACTIVE_STATUSES,
    DEFAULT_PRIORITY,
    JOB_KINDS,
    JOB_STATUSES,
    MAX_PRIORITY,
    QUEUE_OF_KIND,
)

KEY_PREFIX = "e4o_"

# --- jobs ----------------------------------------------------------------------------------------------


def create_job(
    *,
    session: Session,
    kind: str,
    params: dict[str, Any],
    model_version: str,
    owner: str = ANONYMOUS,
    priority: int = DEFAULT_PRIORITY,
    job_id: str | None = None,
    parent_id: str | None = None,
) -> Job:
    """Insert a queued job. ``params`` is the validated payload (``model_dump(mode="json")``); ``parent_id`` the
    job that submits this one, if any."""
    if kind not in JOB_KINDS:
        raise ValueError(f"kind must be one of {JOB_KINDS}, got {kind!r}")
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be in 0..{MAX_PRIORITY}, got {priority}")
    now = utcnow()
    job = Job(
        id=job_id or new_id(),
        kind=kind,
        owner=owner,
        params=params,
        model_version=model_version,
        priority=priority,
        status="queued",
        progress_stage="queued",
        progress_step=0,
        cancel_requested=False,
        attempts=0,
        parent_id=parent_id,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.commit()
    return job


def get_job(*, session: Session, job_id: str) -> Job | None:
    job = session.get(Job, job_id, populate_existing=True)
    return job


def list_jobs(
    *,
    session: Session,
    owner: str | None = None,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """Jobs newest first and the total matching ``owner`` (None: everyone's) and ``status``."""
    if status is not None and status not in JOB_STATUSES:
        raise ValueError(f"status must be one of {JOB_STATUSES}, got {status!r}")
    if limit < 1 or offset < 0:
        raise ValueError(f"limit must be >= 1 and offset >= 0, got limit={limit}, offset={offset}")
    conds = []
    if owner is not None:
        conds.append(Job.owner == owner)
    if status is not None:
        conds.append(Job.status == status)
    count = session.scalar(sa.select(sa.func.count()).select_from(Job).where(*conds)) or 0
    rows = session.scalars(
        sa.select(Job).where(*conds).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    return list(rows), count


def queue_position(*, session: Session, job_id: str) -> int | None:
    """Queued jobs that run before this one on its queue (0: next); None when the job is not queued.

    Order: higher priority first, then older first, the order the broker delivers them in.
    """
    return jobs_with_positions(session=session, job_ids=[job_id]).get(job_id, (None, None))[1]


def jobs_with_positions(*, session: Session, job_ids: list[str]) -> dict[str, tuple[Job, int | None]]:
    """``{id: (job, queue position)}`` of the rows of ``job_ids`` that exist (read afresh), in one statement: each
    queued row's :func:`queue_position` is a subquery of it (the watch hub reads every watched queued job again
    when the queue moves; one COUNT statement per job made that cost grow with the watched jobs)."""
    rows = session.execute(_jobs_with_positions_statement(), {"job_ids": list(job_ids)}).all()
    return {job.id: (job, pos) for job, pos in rows}


@functools.cache
def _jobs_with_positions_statement() -> sa.Select:
    """:func:`jobs_with_positions`'s SELECT, built once (building it and its cache key was most of a call) with
    the ids as an expanding bind parameter ``job_ids``."""
    ahead = aliased(Job)

    def queue_of(kind: Any) -> Any:
        return sa.case(QUEUE_OF_KIND, value=kind, else_="gpu")

    position = (
        sa.select(sa.func.count())
        .select_from(ahead)
        .where(
            ahead.status == "queued",
            queue_of(ahead.kind) == queue_of(Job.kind),
            ahead.id != Job.id,
            sa.or_(ahead.priority > Job.priority,
                   sa.and_(ahead.priority == Job.priority, ahead.created_at < Job.created_at)),
        )
        .correlate(Job)
        .scalar_subquery()
    )
    return (
        sa.select(Job, sa.case((Job.status == "queued", position), else_=None))
        .where(Job.id.in_(sa.bindparam("job_ids", expanding=True)))
        .execution_options(populate_existing=True)  # a row already in the session is refreshed, as get() did
    )


def count_jobs_by_status(*, session: Session) -> dict[str, int]:
    rows = session.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status)).all()
    counts = dict.fromkeys(JOB_STATUSES, 0)
    counts.update({status: n for status, n in rows})
    return counts


def count_recent_jobs(*, session: Session, owner: str, seconds: float) -> int:
    """Jobs ``owner`` submitted in the last ``seconds`` (for the per-key rate limit)."""
    since = utcnow() - timedelta(seconds=seconds)
    return session.scalar(
        sa.select(sa.func.count()).select_from(Job).where(Job.owner == owner, Job.created_at >= since)
    ) or 0


def count_active_jobs(*, session: Session, owner: str) -> int:
    """Queued plus running jobs of ``owner`` (for the per-key queued-job limit)."""
    return session.scalar(
        sa.select(sa.func.count()).select_from(Job).where(Job.owner == owner, Job.status.in_(ACTIVE_STATUSES))
    ) or 0


def _update(session: Session, job_id: str, where: list[Any], **values: Any) -> bool:
    values.setdefault("updated_at", utcnow())
    res = session.execute(
        sa.update(Job).where(Job.id == job_id, *where).values(**values).execution_options(synchronize_session=False)
    )
    session.commit()
    if res.rowcount == 1:
        notify.job_changed(job_id, values.get("status"))  # the gateways re-read the row (echo4o/notify.py)
    return res.rowcount == 1


def _alive_workers(max_age_s: float) -> Any:
    """The ids of the workers that are alive: not ``stopped`` nor ``dead`` and beaten within ``max_age_s``."""
    since = utcnow() - timedelta(seconds=max_age_s)
    return sa.select(Worker.id).where(Worker.status.not_in(GONE_WORKER_STATUSES), Worker.heartbeat_at >= since)


def _fence(attempt: int | None, worker: str | None) -> list[Any]:
    """The conditions under which attempt ``attempt`` of ``worker`` may still write its job's row: the row runs,
    with these attempts and this worker. None: no fence (the gateway, or a write before any claim)."""
    if attempt is None:
        return []
    return [Job.status == "running", Job.attempts == attempt, Job.worker == worker]


class Claimed(NamedTuple):
    """What :func:`mark_running` returns for a job it claimed: the attempt (the fence of the run's writes) and the
    row's timestamps (``started_at - created_at`` is the job's queue wait)."""

    attempts: int
    created_at: datetime
    started_at: datetime


# --- the writes of every job's run, prebuilt ---------------------------------------------------------------------
# A worker writes these for every job (claim, progress, result). Built once, with bind parameters, and run on the
# session's connection: building an ORM UPDATE and passing it through the ORM's bulk path took most of each
# write's time (mark_running: 1.4 ms, 0.5 ms prebuilt). tests/db/test_job_run_writes.py checks
# what they store and when they refuse, on SQLite and PostgreSQL.


def _fence_params(attempt: int | None, worker: str | None) -> dict[str, Any]:
    return {} if attempt is None else {"fence_attempt": attempt, "fence_worker": worker}


def _bound_fence(fenced: bool) -> list[Any]:
    """:func:`_fence` with bind parameters ``fence_attempt`` and ``fence_worker``."""
    if not fenced:
        return []
    return [Job.status == "running", Job.attempts == sa.bindparam("fence_attempt"),
            Job.worker == sa.bindparam("fence_worker")]


@functools.cache
def _claim_statement(stale_after: bool) -> sa.Update:
    """:func:`mark_running`'s UPDATE; ``stale_after``: a running job's worker also counts as gone when it has not
    beaten since ``:beaten_since``."""
    live = sa.select(Worker.id).where(Worker.status.not_in(GONE_WORKER_STATUSES))
    if stale_after:
        live = live.where(Worker.heartbeat_at >= sa.bindparam("beaten_since"))
    gone = Job.worker.is_(None) | Job.worker.not_in(live)
    return (
        sa.update(Job)
        .where(Job.id == sa.bindparam("job_id"),
               sa.or_(Job.status == "queued", sa.and_(Job.status == "running", gone)),
               Job.cancel_requested.is_(False))
        .values(status="running", worker=sa.bindparam("worker"), gpu=sa.bindparam("gpu"), attempts=Job.attempts + 1,
                started_at=sa.bindparam("now"), updated_at=sa.bindparam("now"), progress_stage="starting",
                progress_step=0, progress_total=None, preview=None)
        .returning(Job.attempts, Job.created_at, Job.started_at)
    )


@functools.cache
def _progress_statement(preview: bool, detail: bool, fenced: bool) -> sa.Update:
    """:func:`update_progress`'s UPDATE (with a preview, a detail, a fence or not)."""
    values: dict[str, Any] = {"progress_stage": sa.bindparam("stage"), "progress_step": sa.bindparam("step"),
                              "progress_total": sa.bindparam("total"), "updated_at": sa.bindparam("now")}
    if preview:
        values["preview"] = sa.bindparam("preview")
    if detail:
        values["progress_detail"] = sa.bindparam("detail")
    return (
        sa.update(Job)
        .where(Job.id == sa.bindparam("job_id"), Job.status == "running", *_bound_fence(fenced))
        .values(**values)
        .returning(Job.cancel_requested)
    )


@functools.cache
def _succeeded_statement(fenced: bool) -> sa.Update:
    """:func:`mark_succeeded`'s UPDATE."""
    return (
        sa.update(Job)
        .where(Job.id == sa.bindparam("job_id"), Job.status == "running", *_bound_fence(fenced))
        .values(status="succeeded", result=sa.bindparam("result"), progress_stage="done",
                finished_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
    )


def mark_running(
    *, session: Session, job_id: str, worker: str, gpu: str | None, stale_after_s: float | None = None
) -> Claimed | None:
    """Claim the job for a new attempt (``attempts`` + 1, ``worker``); the caller then writes with that attempt as
    its fence. None when it is finished, cancelled, has a cancel request, or runs on a worker that is alive; else
    the attempt and timestamps, returned by the same statement (no second read on the worker's serving path).

    A ``running`` job is claimed only when its worker is gone (row missing, ``stopped``, ``dead``, or no beat for
    ``stale_after_s`` seconds; None: only a missing, stopped or dead one): a late or duplicated delivery of its
    message never starts a second run beside a live one.
    """
    now = utcnow()
    params: dict[str, Any] = {"job_id": job_id, "worker": worker, "gpu": gpu, "now": now}
    if stale_after_s is not None:
        params["beaten_since"] = now - timedelta(seconds=stale_after_s)
    row = session.connection().execute(_claim_statement(stale_after_s is not None), params).one_or_none()
    session.commit()
    if row is None:
        return None
    notify.job_changed(job_id, "running")  # the gateways re-read the row (echo4o/notify.py)
    return Claimed(int(row.attempts), row.created_at, row.started_at)


def holds_job(*, session: Session, job_id: str, attempt: int, worker: str) -> bool:
    """Whether attempt ``attempt`` of ``worker`` still holds the job (it runs, with these attempts and worker)."""
    return session.scalar(sa.select(sa.func.count()).select_from(Job).where(Job.id == job_id,
                                                                            *_fence(attempt, worker))) == 1


def update_progress(
    *,
    session: Session,
    job_id: str,
    step: int,
    total: int | None,
    stage: str = "sampling",
    preview: bytes | None = None,
    detail: dict[str, Any] | None = None,
    attempt: int | None = None,
    worker: str | None = None,
) -> bool:
    """Record progress of a running job; returns True when a cancel was requested (the caller stops).

    ``detail`` (JSON) replaces the job's ``progress_detail`` when given. One statement (``UPDATE ... RETURNING
    cancel_requested``), so a progress write and the cancel check cost one round trip; a job that is no longer
    running is read back instead. With ``attempt`` and ``worker`` (the claim's fence) nothing is written unless
    that attempt still holds the job, and True is returned when it does not (the run stops)."""
    params: dict[str, Any] = {"job_id": job_id, "stage": stage, "step": step, "total": total, "now": utcnow(),
                              **_fence_params(attempt, worker)}
    if preview is not None:
        params["preview"] = preview
    if detail is not None:
        params["detail"] = detail
    statement = _progress_statement(preview is not None, detail is not None, attempt is not None)
    cancel = session.connection().execute(statement, params).scalar_one_or_none()
    session.commit()
    if cancel is not None:
        notify.job_changed(job_id)
    if cancel is None:
        if attempt is not None:
            return True
        return bool(session.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id)))
    return bool(cancel)


def mark_succeeded(
    *, session: Session, job_id: str, result: dict[str, Any], attempt: int | None = None, worker: str | None = None
) -> bool:
    """Store the result of a running job; with ``attempt`` and ``worker`` only while that attempt holds it, so a
    result is written once, by the attempt that owns the row."""
    params = {"job_id": job_id, "result": result, "now": utcnow(), **_fence_params(attempt, worker)}
    res = session.connection().execute(_succeeded_statement(attempt is not None), params)
    session.commit()
    if res.rowcount == 1:
        notify.job_changed(job_id, "succeeded")  # the gateways re-read the row (echo4o/notify.py)
    return res.rowcount == 1


def mark_failed(
    *, session: Session, job_id: str, code: str, message: str, attempt: int | None = None, worker: str | None = None
) -> bool:
    """Fail an active job (with ``attempt`` and ``worker``: only while that attempt holds it)."""
    now = utcnow()
    return _update(
        session,
        job_id,
        [Job.status.in_(ACTIVE_STATUSES), *_fence(attempt, worker)],
        status="failed",
        error_code=code,
        error_message=message[:4000],
        progress_stage="failed",
        finished_at=now,
        updated_at=now,
    )


def mark_cancelled(
    *, session: Session, job_id: str, attempt: int | None = None, worker: str | None = None
) -> bool:
    """Cancel an active job (with ``attempt`` and ``worker``: only while that attempt holds it)."""
    now = utcnow()
    return _update(
        session,
        job_id,
        [Job.status.in_(ACTIVE_STATUSES), *_fence(attempt, worker)],
        status="cancelled",
        cancel_requested=True,
        progress_stage="cancelled",
        finished_at=now,
        updated_at=now,
    )


def request_cancel(*, session: Session, job_id: str) -> Job | None:
    """Cancel a job: a queued one is cancelled at once (it will never run); a running one gets
    ``cancel_requested`` and stops at its next step. Finished jobs are left as they are."""
    now = utcnow()
    if not _update(
        session,
        job_id,
        [Job.status == "queued"],
        status="cancelled",
        cancel_requested=True,
        progress_stage="cancelled",
        finished_at=now,
        updated_at=now,
    ):
        _update(session, job_id, [Job.status == "running"], cancel_requested=True)
    return get_job(session=session, job_id=job_id)


def requeue_job(*, session: Session, job_id: str, attempt: int | None = None, worker: str | None = None) -> bool:
    """Put a ``running`` job back to ``queued`` (its worker died, or stops before the job ends); with ``attempt``
    and ``worker`` only while that attempt holds it. The caller then sends its message again."""
    return _update(
        session, job_id, [Job.status == "running", *_fence(attempt, worker)],
        status="queued", progress_stage="queued", progress_step=0,
    )


def stale_running_jobs(*, session: Session, max_age_s: float) -> list[Job]:
    """Running jobs whose worker row is missing, stopped, dead or has not beaten for ``max_age_s`` seconds."""
    alive = _alive_workers(max_age_s)
    return list(
        session.scalars(
            sa.select(Job).where(Job.status == "running", sa.or_(Job.worker.is_(None), Job.worker.not_in(alive)))
        ).all()
    )


def mark_dead_workers(*, session: Session, max_age_s: float) -> list[str]:
    """Mark ``dead`` the workers that are neither ``stopped`` nor ``dead`` and have not beaten for ``max_age_s``
    seconds (one conditional UPDATE); returns their ids. A dead worker that beats again is alive again (its
    heartbeat writes its status), but the jobs taken from it stay taken: their rows fence its writes out."""
    since = utcnow() - timedelta(seconds=max_age_s)
    ids = session.scalars(
        sa.update(Worker)
        .where(Worker.status.not_in(GONE_WORKER_STATUSES), Worker.heartbeat_at < since)
        .values(status="dead")
        .returning(Worker.id)
        .execution_options(synchronize_session=False)
    ).all()
    session.commit()
    return list(ids)


def requeue_jobs_of_dead_workers(*, session: Session, worker: str | None = None
                                 ) -> list[tuple[str, str, int, str, int]]:
    """Put back to ``queued`` every ``running`` job whose worker is ``dead`` or ``stopped`` (a worker in either
    state runs nothing; one conditional UPDATE, so of two workers sweeping at once only one requeues a job); with
    ``worker``, every running job of that worker instead (it is stopping: a batch's companions with the lead).
    Returns ``(id, kind, priority, worker, attempts)`` of each job requeued, whose message the caller sends again."""
    if worker is None:
        holder = Job.worker.in_(sa.select(Worker.id).where(Worker.status.in_(GONE_WORKER_STATUSES)))
    else:
        holder = Job.worker == worker
    rows = session.execute(
        sa.update(Job)
        .where(Job.status == "running", holder)
        .values(status="queued", progress_stage="queued", progress_step=0, updated_at=utcnow())
        .returning(Job.id, Job.kind, Job.priority, Job.worker, Job.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    session.commit()
    for row in rows:
        notify.job_changed(row[0], "queued")  # watchers see the requeue at once, not at their safety poll
    return [tuple(r) for r in rows]


# --- API keys ------------------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(*, session: Session, name: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """Store a new key (hashed) and return it with the plaintext key, which is shown this once only."""
    if not name or len(name) > 200:
        raise ValueError("name must be 1..200 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id(), name=name, key_hash=hash_key(key), prefix=key[:8], is_admin=is_admin, created_at=utcnow()
    )
    session.add(row)
    session.commit()
    return row, key


def verify_api_key(*, session: Session, key: str) -> ApiKey | None:
    """The active key row matching ``key``; None for an unknown or revoked key."""
    if not key:
        return None
    row = session.scalar(sa.select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke_api_key(*, session: Session, key_id: str) -> bool:
    """Revoke by id (or by the displayed prefix when it matches exactly one key)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        matches = session.scalars(sa.select(ApiKey).where(ApiKey.prefix == key_id)).all()
        row = matches[0] if len(matches) == 1 else None
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.commit()
    return True


def list_api_keys(*, session: Session, include_revoked: bool = False) -> list[ApiKey]:
    stmt = sa.select(ApiKey).order_by(ApiKey.created_at)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt).all())


# --- workers -------------------------------------------------------------------------------------------


def upsert_worker(
    *,
    session: Session,
    worker_id: str,
    hostname: str,
    queues: list[str] | str,
    status: str = "loading",
    model_version: str | None = None,
    device: str | None = None,
    attention: str | None = None,
) -> Worker:
    now = utcnow()
    queues_txt = ",".join(queues) if not isinstance(queues, str) else queues
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, started_at=now)
        session.add(row)
    row.hostname = hostname
    row.queues = queues_txt
    row.status = status
    row.model_version = model_version
    row.device = device
    row.attention = attention
    row.heartbeat_at = now
    session.commit()
    return row


def worker_heartbeat(*, session: Session, worker_id: str, status: str | None = None, **fields: Any) -> bool:
    """Refresh a worker's heartbeat (and optionally its status and other columns)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow(), **fields}
    if status is not None:
        values["status"] = status
    res = session.execute(
        sa.update(Worker).where(Worker.id == worker_id).values(**values).execution_options(synchronize_session=False)
    )
    session.commit()
    return res.rowcount == 1


def list_workers(*, session: Session) -> list[Worker]:
    return list(session.scalars(sa.select(Worker).order_by(Worker.started_at)).all())


def list_ready_workers(*, session: Session, max_age_s: float = 30.0, queue: str | None = None) -> list[Worker]:
    """Workers with the model loaded (``ready`` or ``busy``) whose heartbeat is newer than ``max_age_s``."""
    since = utcnow() - timedelta(seconds=max_age_s)
    rows = session.scalars(
        sa.select(Worker)
        .where(Worker.status.in_(("ready", "busy")), Worker.heartbeat_at >= since)
        .order_by(Worker.started_at)
    ).all()
    if queue is not None:
        rows = [w for w in rows if queue in w.queues.split(",")]
    return list(rows)


#: :func:`queued_jobs_of_kinds`' SELECT, prebuilt (as the writes of a job's run above: every job runs it).
_QUEUED_OF_KINDS = (
    sa.select(Job.id, Job.kind, Job.params, Job.model_version, Job.parent_id, Job.priority)
    .where(Job.status == "queued", Job.kind.in_(sa.bindparam("kinds", expanding=True)),
           Job.cancel_requested.is_(False), Job.id.not_in(sa.bindparam("exclude", expanding=True)),
           Job.priority > sa.bindparam("above"))
    .order_by(Job.priority.desc(), Job.created_at)
    .limit(sa.bindparam("limit"))
)


def queued_jobs_of_kinds(*, session: Session, kinds: tuple[str, ...], exclude: set[str], limit: int,
                         above: int = -1) -> list[Any]:
    """Queued jobs of ``kinds`` without a cancel request, not in ``exclude``, of a priority above ``above``, in
    delivery order (higher priority first, then older first), at most ``limit`` (worker/batching.py: the candidates
    of a batch; worker/preemption.py: the jobs that may pause a run). Rows of their ``id``, ``kind``, ``params``,
    ``model_version``, ``parent_id`` and ``priority``."""
    params = {"kinds": list(kinds), "exclude": sorted(exclude), "limit": limit, "above": above}
    return list(session.connection().execute(_QUEUED_OF_KINDS, params).all())
