"""The job row's attempt decides who may write: a claim never takes a job that runs on a live worker, a stale attempt
(its job was requeued and claimed again) writes no progress, result or failure, and a dead worker's running jobs are
requeued by one sweeper only. On SQLite and PostgreSQL, through the crud functions."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from echo4o.db import crud, session_scope
from echo4o.db.models import Job, Worker, utcnow
from tests.db.conftest import db_url

#: The db tests' fixture: each test here runs on a SQLite file and on PostgreSQL.
FIXTURES = (db_url,)
DEAD_AFTER_S = 3.0


def _job(s) -> str:
    return crud.create_job(session=s, kind="generate", params={"prompt": "p", "seed": 1}, model_version="tiny").id


def _worker(s, worker_id: str, *, status: str = "busy", age_s: float = 0.0) -> None:
    crud.upsert_worker(session=s, worker_id=worker_id, hostname="h", queues=["gpu"], status=status)
    s.execute(sa.update(Worker).where(Worker.id == worker_id)
              .values(heartbeat_at=utcnow() - timedelta(seconds=age_s)))
    s.commit()


def _claim(s, job_id: str, worker: str) -> int | None:
    """Claim as a worker does; the attempt number, or None when refused."""
    if not crud.mark_running(session=s, job_id=job_id, worker=worker, gpu=None, stale_after_s=DEAD_AFTER_S):
        return None
    return crud.get_job(session=s, job_id=job_id).attempts


def test_claim_never_takes_a_job_running_on_a_live_worker(db_url: str) -> None:
    with session_scope(db_url) as s:
        _worker(s, "a:1")
        _worker(s, "b:2")
        job_id = _job(s)
        assert _claim(s, job_id, "a:1") == 1
        # a late or duplicate delivery of its message to b: refused, the row is untouched
        assert _claim(s, job_id, "b:2") is None
        row = crud.get_job(session=s, job_id=job_id)
        assert (row.status, row.worker, row.attempts) == ("running", "a:1", 1)


@pytest.mark.parametrize("gone", ["silent", "stopped", "dead", "no row"])
def test_claim_takes_a_running_job_whose_worker_is_gone(db_url: str, gone: str) -> None:
    with session_scope(db_url) as s:
        _worker(s, "b:2")
        if gone == "silent":
            _worker(s, "a:1", age_s=DEAD_AFTER_S + 5)
        elif gone in ("stopped", "dead"):
            _worker(s, "a:1", status=gone)
        job_id = _job(s)
        assert crud.mark_running(session=s, job_id=job_id, worker="a:1", gpu=None)
        assert _claim(s, job_id, "b:2") == 2
        row = crud.get_job(session=s, job_id=job_id)
        assert (row.status, row.worker) == ("running", "b:2")


def test_stale_attempt_cannot_write_progress_result_or_failure(db_url: str) -> None:
    with session_scope(db_url) as s:
        _worker(s, "a:1")
        _worker(s, "b:2")
        job_id = _job(s)
        old = {"attempt": _claim(s, job_id, "a:1"), "worker": "a:1"}
        assert crud.update_progress(session=s, job_id=job_id, step=3, total=10, **old) is False  # it holds the job
        assert crud.holds_job(session=s, job_id=job_id, **old)
        # a's heartbeat stops: it is found dead, its job requeued and claimed by b
        _worker(s, "a:1", age_s=DEAD_AFTER_S + 5)
        assert crud.mark_dead_workers(session=s, max_age_s=DEAD_AFTER_S) == ["a:1"]
        assert [r[0] for r in crud.requeue_jobs_of_dead_workers(session=s)] == [job_id]
        assert crud.get_job(session=s, job_id=job_id).status == "queued"
        # while queued, the old attempt writes nothing (and is told to stop)
        assert crud.update_progress(session=s, job_id=job_id, step=4, total=10, **old) is True
        new = {"attempt": _claim(s, job_id, "b:2"), "worker": "b:2"}
        assert new["attempt"] == 2
        assert crud.update_progress(session=s, job_id=job_id, step=1, total=10, **new) is False

        # a comes back (it was only slow): every write of its attempt is refused
        assert not crud.holds_job(session=s, job_id=job_id, **old)
        assert crud.update_progress(session=s, job_id=job_id, step=9, total=10, preview=b"old", **old) is True
        assert not crud.mark_succeeded(session=s, job_id=job_id, result={"images": ["old"]}, **old)
        assert not crud.mark_failed(session=s, job_id=job_id, code="engine_error", message="old", **old)
        assert not crud.mark_cancelled(session=s, job_id=job_id, **old)
        assert not crud.requeue_job(session=s, job_id=job_id, **old)
        row = crud.get_job(session=s, job_id=job_id)
        assert (row.status, row.worker, row.attempts, row.progress_step, row.preview) == ("running", "b:2", 2, 1, None)

        # the attempt that holds the job writes its result, once
        assert crud.mark_succeeded(session=s, job_id=job_id, result={"images": ["new"]}, **new)
        assert not crud.mark_succeeded(session=s, job_id=job_id, result={"images": ["again"]}, **new)
        row = crud.get_job(session=s, job_id=job_id)
        assert (row.status, row.result, row.attempts) == ("succeeded", {"images": ["new"]}, 2)


def test_dead_workers_jobs_are_requeued_by_one_sweeper(db_url: str) -> None:
    with session_scope(db_url) as s:
        _worker(s, "live:1")
        _worker(s, "dead:2", age_s=DEAD_AFTER_S + 5)
        _worker(s, "stopped:3", status="stopped", age_s=DEAD_AFTER_S + 5)
        on_dead, on_live = _job(s), _job(s)
        crud.mark_running(session=s, job_id=on_dead, worker="dead:2", gpu=None)
        crud.mark_running(session=s, job_id=on_live, worker="live:1", gpu=None)

        assert crud.mark_dead_workers(session=s, max_age_s=DEAD_AFTER_S) == ["dead:2"]
        assert crud.mark_dead_workers(session=s, max_age_s=DEAD_AFTER_S) == []  # a second sweeper: nothing left
        statuses = dict(s.execute(sa.select(Worker.id, Worker.status)).all())
        assert statuses == {"live:1": "busy", "dead:2": "dead", "stopped:3": "stopped"}

        requeued = crud.requeue_jobs_of_dead_workers(session=s)
        assert requeued == [(on_dead, "generate", 5, "dead:2", 1)]
        assert crud.requeue_jobs_of_dead_workers(session=s) == []  # the second sweeper requeues nothing
        rows = dict(s.execute(sa.select(Job.id, Job.status)).all())
        assert rows == {on_dead: "queued", on_live: "running"}

        # a dead worker that beats again is alive again; the job it lost stays lost
        crud.worker_heartbeat(session=s, worker_id="dead:2", status="busy")
        assert crud.mark_dead_workers(session=s, max_age_s=DEAD_AFTER_S) == []
        assert crud.get_job(session=s, job_id=on_dead).status == "queued"


def test_concurrent_sweepers_requeue_each_job_once(db_url: str) -> None:
    """Two sweepers in two transactions at once (PostgreSQL: row locks; SQLite: one writer): each job once."""
    import threading

    with session_scope(db_url) as s:
        _worker(s, "dead:2", status="dead")
        jobs = [_job(s) for _ in range(20)]
        for job_id in jobs:
            crud.mark_running(session=s, job_id=job_id, worker="dead:2", gpu=None)
    results: list[list[str]] = []
    barrier = threading.Barrier(2)

    def sweep() -> None:
        with session_scope(db_url) as s:
            barrier.wait()
            results.append([r[0] for r in crud.requeue_jobs_of_dead_workers(session=s)])

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results[0] + results[1]) == sorted(jobs)
