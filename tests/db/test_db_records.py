"""Job, API key and worker records through the crud functions, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from echo4o.db import crud, session_scope
from echo4o.db.models import Job, Worker, utcnow


def _job(s, *, owner="alice", priority=5, kind="generate", prompt="p"):
    return crud.create_job(
        session=s, kind=kind, owner=owner, params={"prompt": prompt, "seed": 1}, model_version="tiny", priority=priority
    )


def test_job_lifecycle_success(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        assert len(job.id) == 32 and job.status == "queued" and job.attempts == 0
        assert job.created_at.tzinfo is not None
        assert crud.mark_running(session=s, job_id=job.id, worker="host:1", gpu="cpu")
        for step in (1, 2, 3):
            assert crud.update_progress(session=s, job_id=job.id, step=step, total=3, preview=b"\x89PNG") is False
        result = {"images": [f"results/{job.id}/0.png"], "seed": 1, "timings": {"sampling_s": 0.1}}
        assert crud.mark_succeeded(session=s, job_id=job.id, result=result)
    with session_scope(db_url) as s:  # a fresh session reads what was committed
        row = crud.get_job(session=s, job_id=job.id)
        assert row.status == "succeeded" and row.result == result and row.params == {"prompt": "p", "seed": 1}
        assert (row.progress_step, row.progress_total, row.preview) == (3, 3, b"\x89PNG")
        assert row.worker == "host:1" and row.gpu == "cpu" and row.attempts == 1
        assert row.created_at <= row.started_at <= row.finished_at
        # a finished job cannot be claimed, failed or cancelled again
        assert not crud.mark_running(session=s, job_id=job.id, worker="h:2", gpu=None)
        assert not crud.mark_failed(session=s, job_id=job.id, code="x", message="y")
        assert crud.request_cancel(session=s, job_id=job.id).status == "succeeded"
        assert crud.get_job(session=s, job_id="0" * 32) is None


def test_redelivered_running_job_is_claimed_again(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        assert crud.mark_running(session=s, job_id=job.id, worker="a:1", gpu="cuda:0")
        assert crud.mark_running(session=s, job_id=job.id, worker="b:2", gpu="cuda:1")
        row = crud.get_job(session=s, job_id=job.id)
        assert (row.attempts, row.worker) == (2, "b:2")
        assert crud.mark_failed(session=s, job_id=job.id, code="engine_error", message="boom")
        row = crud.get_job(session=s, job_id=job.id)
        assert (row.status, row.error_code, row.error_message) == ("failed", "engine_error", "boom")


def test_cancel_queued_and_running(db_url: str) -> None:
    with session_scope(db_url) as s:
        queued = _job(s)
        row = crud.request_cancel(session=s, job_id=queued.id)
        assert row.status == "cancelled" and row.cancel_requested and row.finished_at is not None
        assert not crud.mark_running(session=s, job_id=queued.id, worker="w:1", gpu=None)  # never runs

        running = _job(s)
        crud.mark_running(session=s, job_id=running.id, worker="w:1", gpu=None)
        row = crud.request_cancel(session=s, job_id=running.id)
        assert row.status == "running" and row.cancel_requested
        assert crud.update_progress(session=s, job_id=running.id, step=1, total=4) is True
        assert crud.mark_cancelled(session=s, job_id=running.id)
        assert crud.get_job(session=s, job_id=running.id).status == "cancelled"
        assert crud.request_cancel(session=s, job_id="f" * 32) is None


def test_list_filter_and_paginate(db_url: str) -> None:
    with session_scope(db_url) as s:
        ids = [_job(s, owner="alice").id for _ in range(5)]
        _job(s, owner="bob")
        crud.mark_running(session=s, job_id=ids[0], worker="w:1", gpu=None)
        rows, count = crud.list_jobs(session=s, owner="alice", limit=2, offset=0)
        assert count == 5 and [r.id for r in rows] == ids[::-1][:2]  # newest first
        rows, count = crud.list_jobs(session=s, owner="alice", limit=2, offset=4)
        assert count == 5 and [r.id for r in rows] == [ids[0]]
        rows, count = crud.list_jobs(session=s, owner="alice", status="running")
        assert count == 1 and rows[0].id == ids[0]
        assert crud.list_jobs(session=s)[1] == 6
        with pytest.raises(ValueError, match="status must be one of"):
            crud.list_jobs(session=s, status="done")
        assert crud.count_jobs_by_status(session=s)["queued"] == 5


def test_queue_position_follows_priority_then_age(db_url: str) -> None:
    with session_scope(db_url) as s:
        a = _job(s, priority=5)
        b = _job(s, priority=5)
        c = _job(s, priority=9)  # jumps ahead of a and b
        d = _job(s, priority=0)
        t = _job(s, priority=9, kind="finetune")  # other queue: not counted
        pos = {j: crud.queue_position(session=s, job_id=j.id) for j in (a, b, c, d, t)}
        assert (pos[c], pos[a], pos[b], pos[d], pos[t]) == (0, 1, 2, 3, 0)
        crud.mark_running(session=s, job_id=c.id, worker="w:1", gpu=None)
        assert crud.queue_position(session=s, job_id=c.id) is None
        assert crud.queue_position(session=s, job_id=b.id) == 1


def test_jobs_with_positions_reads_rows_and_positions_in_one_statement(db_url: str) -> None:
    from tests.support.statements import recorded_statements

    with session_scope(db_url) as s:
        jobs = [_job(s, priority=p) for p in (5, 5, 9, 0)] + [_job(s, priority=9, kind="finetune"),
                                                              _job(s, priority=1, kind="finetune")]
        crud.mark_running(session=s, job_id=jobs[1].id, worker="w:1", gpu=None)
        ids = [j.id for j in jobs] + ["0" * 32]  # and one that does not exist
    with session_scope(db_url) as s:
        with recorded_statements(db_url) as log:
            got = crud.jobs_with_positions(session=s, job_ids=ids)
        assert len(log.statements) == 1
    # priority 9 first, then the two 5s by age (the running one left out), then 0; the train queue on its own
    expected = {jobs[0].id: 1, jobs[1].id: None, jobs[2].id: 0, jobs[3].id: 2, jobs[4].id: 0, jobs[5].id: 1}
    assert {i: pos for i, (_, pos) in got.items()} == expected  # the missing id has no entry
    assert all(job.id == i for i, (job, _) in got.items())


def test_limits_counters(db_url: str) -> None:
    with session_scope(db_url) as s:
        jobs = [_job(s, owner="carol") for _ in range(3)]
        crud.mark_running(session=s, job_id=jobs[0].id, worker="w:1", gpu=None)
        crud.request_cancel(session=s, job_id=jobs[1].id)
        assert crud.count_active_jobs(session=s, owner="carol") == 2
        assert crud.count_recent_jobs(session=s, owner="carol", seconds=60) == 3
        assert crud.count_recent_jobs(session=s, owner="dave", seconds=60) == 0
        old = utcnow() - timedelta(hours=2)
        s.execute(sa.update(Job).where(Job.id == jobs[2].id).values(created_at=old))
        s.commit()
        assert crud.count_recent_jobs(session=s, owner="carol", seconds=3600) == 2


def test_api_keys_hashed_verify_revoke(db_url: str) -> None:
    with session_scope(db_url) as s:
        row, key = crud.create_api_key(session=s, name="ci", is_admin=True)
        assert key.startswith(crud.KEY_PREFIX) and len(key) > 40
        assert row.key_hash == crud.hash_key(key) and key not in row.key_hash and row.prefix == key[:8]
        got = crud.verify_api_key(session=s, key=key)
        assert got is not None and got.id == row.id and got.is_admin
        assert crud.verify_api_key(session=s, key=key + "x") is None
        assert crud.verify_api_key(session=s, key="") is None
        _, other = crud.create_api_key(session=s, name="user")
        assert [k.name for k in crud.list_api_keys(session=s)] == ["ci", "user"]
        assert crud.revoke_api_key(session=s, key_id=row.id)
        assert not crud.revoke_api_key(session=s, key_id=row.id)
        assert crud.verify_api_key(session=s, key=key) is None
        assert crud.verify_api_key(session=s, key=other) is not None
        assert [k.name for k in crud.list_api_keys(session=s)] == ["user"]
        assert len(crud.list_api_keys(session=s, include_revoked=True)) == 2


def test_workers_heartbeat_and_readiness(db_url: str) -> None:
    with session_scope(db_url) as s:
        crud.upsert_worker(session=s, worker_id="h:1", hostname="h", queues=["gpu"], status="loading")
        assert crud.list_ready_workers(session=s) == []
        crud.upsert_worker(
            session=s, worker_id="h:1", hostname="h", queues=["gpu"], status="ready",
            model_version="tiny", device="cpu", attention="sdpa",
        )
        crud.upsert_worker(session=s, worker_id="h:2", hostname="h", queues="train", status="ready")
        assert [w.id for w in crud.list_ready_workers(session=s)] == ["h:1", "h:2"]
        assert [w.id for w in crud.list_ready_workers(session=s, queue="gpu")] == ["h:1"]
        # an older heartbeat to move from (no sleep: the clock need not have ticked)
        s.execute(sa.update(Worker).where(Worker.id == "h:1").values(heartbeat_at=utcnow() - timedelta(minutes=1)))
        s.commit()
        s.expire_all()
        before = s.get(Worker, "h:1").heartbeat_at
        assert crud.worker_heartbeat(session=s, worker_id="h:1", status="busy")
        s.expire_all()
        w = s.get(Worker, "h:1")
        assert w.status == "busy" and w.heartbeat_at > before and w.queues == "gpu"
        assert not crud.worker_heartbeat(session=s, worker_id="nope:0")
        # a stale heartbeat is not ready, and its running jobs are orphans
        s.execute(sa.update(Worker).where(Worker.id == "h:1").values(heartbeat_at=utcnow() - timedelta(minutes=5)))
        s.commit()
        assert [w.id for w in crud.list_ready_workers(session=s)] == ["h:2"]
        job = _job(s)
        crud.mark_running(session=s, job_id=job.id, worker="h:1", gpu=None)
        assert [j.id for j in crud.stale_running_jobs(session=s, max_age_s=30)] == [job.id]
        assert crud.requeue_job(session=s, job_id=job.id)
        assert crud.get_job(session=s, job_id=job.id).status == "queued"
