"""The writes of a job's run (claim, progress, result: prebuilt statements in ``echo4o.db.crud``), on SQLite and
PostgreSQL: what they store, what they return, and when the claim's fence or a live worker refuses them."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from echo4o.db import crud, session_scope
from echo4o.db.models import Worker, utcnow


def _queued(s) -> str:  # noqa: ANN001
    return crud.create_job(session=s, kind="generate", owner="alice", params={"prompt": "p"}, model_version="tiny").id


def test_claim_returns_the_attempt_and_the_rows_timestamps(db_url: str) -> None:
    with session_scope(db_url) as s:
        job_id = _queued(s)
        claimed = crud.mark_running(session=s, job_id=job_id, worker="w:1", gpu="cuda:0", stale_after_s=30)
        row = crud.get_job(session=s, job_id=job_id)
        assert claimed == (1, row.created_at, row.started_at)
        assert (row.status, row.worker, row.gpu, row.progress_stage, row.progress_step) == (
            "running", "w:1", "cuda:0", "starting", 0)
        assert row.updated_at == row.started_at


def test_fenced_progress_and_result_are_written_only_by_the_attempt_holding_the_job(db_url: str) -> None:
    with session_scope(db_url) as s:
        job_id = _queued(s)
        assert crud.mark_running(session=s, job_id=job_id, worker="w:1", gpu=None).attempts == 1
        detail = {"loss": 0.25, "lr": [1e-4]}
        assert crud.update_progress(session=s, job_id=job_id, step=2, total=4, stage="training", preview=b"\x89PNG",
                                    detail=detail, attempt=1, worker="w:1") is False
        # another attempt (or worker) is told to stop, and writes nothing
        assert crud.update_progress(session=s, job_id=job_id, step=3, total=4, attempt=2, worker="w:1") is True
        assert crud.update_progress(session=s, job_id=job_id, step=3, total=4, attempt=1, worker="w:2") is True
        assert not crud.mark_succeeded(session=s, job_id=job_id, result={"images": []}, attempt=1, worker="w:2")
        row = crud.get_job(session=s, job_id=job_id)
        assert (row.status, row.progress_stage, row.progress_step, row.progress_total) == ("running", "training", 2, 4)
        assert row.preview == b"\x89PNG" and row.progress_detail == detail
        # a write without preview or detail keeps the stored ones
        assert crud.update_progress(session=s, job_id=job_id, step=4, total=4, attempt=1, worker="w:1") is False
        result = {"images": [f"results/{job_id}/0.png"], "seed": 7, "timings": {"sampling_s": 0.5}}
        assert crud.mark_succeeded(session=s, job_id=job_id, result=result, attempt=1, worker="w:1")
    with session_scope(db_url) as s:
        row = crud.get_job(session=s, job_id=job_id)
        assert (row.status, row.result, row.progress_stage, row.progress_step) == ("succeeded", result, "done", 4)
        assert row.preview == b"\x89PNG" and row.progress_detail == detail
        assert row.finished_at >= row.started_at
        # an ended job takes no more progress, and its result is not written twice
        assert crud.update_progress(session=s, job_id=job_id, step=5, total=5) is False
        assert not crud.mark_succeeded(session=s, job_id=job_id, result={"images": []})
        assert crud.get_job(session=s, job_id=job_id).result == result


def test_a_running_job_is_claimed_again_only_from_a_gone_worker(db_url: str) -> None:
    with session_scope(db_url) as s:
        crud.upsert_worker(session=s, worker_id="old:1", hostname="old", queues=["gpu"], status="busy")
        job_id = _queued(s)
        assert crud.mark_running(session=s, job_id=job_id, worker="old:1", gpu=None)
        # its worker beats: no one else claims the job, with or without a staleness limit
        assert crud.mark_running(session=s, job_id=job_id, worker="new:1", gpu=None, stale_after_s=30) is None
        assert crud.mark_running(session=s, job_id=job_id, worker="new:1", gpu=None) is None
        # silent for 5 minutes: stale after 30 s, but still alive when no limit is given
        s.execute(sa.update(Worker).where(Worker.id == "old:1").values(heartbeat_at=utcnow() - timedelta(minutes=5)))
        s.commit()
        assert crud.mark_running(session=s, job_id=job_id, worker="new:1", gpu=None) is None
        claimed = crud.mark_running(session=s, job_id=job_id, worker="new:1", gpu=None, stale_after_s=30)
        assert claimed is not None and claimed.attempts == 2
        assert crud.get_job(session=s, job_id=job_id).worker == "new:1"
        # a cancel request keeps even a gone worker's job from being claimed
        other = _queued(s)
        crud.request_cancel(session=s, job_id=other)
        assert crud.mark_running(session=s, job_id=other, worker="new:1", gpu=None) is None


def test_batch_candidates_are_queued_jobs_of_the_kinds_in_delivery_order(db_url: str) -> None:
    with session_scope(db_url) as s:
        def job(kind: str = "generate", priority: int = 5) -> str:
            return crud.create_job(session=s, kind=kind, owner="alice", params={"prompt": kind}, model_version="tiny",
                                   priority=priority).id

        old, urgent, lead, multiref, cancelled, running, finetune, newest = (
            job(), job(priority=9), job(), job("multiref"), job(), job(), job("finetune"), job())
        crud.request_cancel(session=s, job_id=cancelled)
        crud.mark_running(session=s, job_id=running, worker="w:1", gpu=None)
        rows = crud.queued_jobs_of_kinds(session=s, kinds=("generate", "multiref"), exclude={lead}, limit=10)
        assert [r.id for r in rows] == [urgent, old, multiref, newest]
        assert (rows[2].kind, rows[2].params, rows[2].model_version, rows[2].parent_id) == (
            "multiref", {"prompt": "multiref"}, "tiny", None)
        assert [r.id for r in crud.queued_jobs_of_kinds(session=s, kinds=("generate",), exclude={lead, urgent},
                                                         limit=2)] == [old, newest]
        assert crud.queued_jobs_of_kinds(session=s, kinds=("finetune",), exclude={finetune}, limit=5) == []
