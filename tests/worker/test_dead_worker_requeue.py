"""Dead workers are found fast: two real Redis workers, the busy one SIGKILLed mid-job; the other worker's heartbeat
sweep finds it silent for three beats, marks it dead, requeues its job and sends it again, and the job runs to the end
on the live worker, once: attempts 2, one result. The broker's own redelivery (its visibility timeout is an hour
away here) plays no part. Before the kill, a duplicate of the job's message reaches the idle worker, which drops it
(the job runs on a live worker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from echo4o import queue
from echo4o.settings import get_settings
from tests.support.worker_proc import WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import KILLABLE, submit, use_env, worker_env


@pytest.fixture
def two_workers(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    """Two workers on the test's settings, started together (each loads the model on its own)."""
    workers = [WorkerProcess(model=tiny_model, log_path=tmp_path / f"w{n}.log").start() for n in (1, 2)]
    try:
        for w in workers:
            w.wait_ready()
        yield workers[0], workers[1]
    finally:
        for w in workers:
            w.stop()


def test_killed_busy_worker_job_runs_again_on_the_other_worker_once(
    tmp_path: Path, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    use_env(monkeypatch, worker_env(data, tiny_model, ECHO4O_BROKER_URL=redis_url, ECHO4O_JOB_TIMEOUT_S="3600"))
    assert get_settings().broker_visibility_timeout_s > 3000  # Redis would redeliver only after an hour
    w1, w2 = request.getfixturevalue("two_workers")

    job_id = submit(prompt="dead worker", seed=5, **KILLABLE)  # MAX_STEPS: long enough to be killed mid-run
    job = wait_for_progress(job_id)  # mid-sampling on one of them
    busy, idle = (w1, w2) if job.worker == w1.worker_id else (w2, w1)
    assert job.worker == busy.worker_id and job.attempts == 1
    queue.submit(job_id, "generate")  # a duplicate delivery: the idle worker takes it while the job runs on busy
    busy.kill()

    job = wait_for_job(job_id, worker=idle)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert (job.attempts, job.worker) == (2, idle.worker_id)
    assert busy.status() == "dead"
    logs = idle.logs()
    assert "requeued a job whose worker is gone" in logs
    # the duplicate came while the killed worker's heartbeat was fresh: dropped, not run beside it
    assert "duplicate delivery dropped" in logs and "job already finished" not in logs
    files = sorted(p.name for p in (data / "results" / job_id).iterdir())
    assert files == ["0.png"] and job.result["images"] == [f"results/{job_id}/0.png"]
