"""Embedded mode: no ECHO4O_BROKER_URL, no Redis. The gateway side enqueues into the SQLite broker in the
data dir and a real worker subprocess runs the job; a SIGKILLed embedded worker's job is requeued from the
job records by the next worker to start (the SQLite transport cannot redeliver it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from echo4o import queue
from echo4o.pnginfo import params_from_png
from echo4o.settings import get_settings
from tests.support.worker_proc import WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import KILLABLE, QUICK, submit, use_env, worker_env


def test_embedded_broker_runs_jobs_and_recovers_a_killed_workers_job(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model))
    assert get_settings().embedded_broker
    assert queue.ping_broker()["transport"] == "echo4osqla"

    with WorkerProcess(model=tiny_model, log_path=tmp_path / "first.log") as first:
        job_id = submit(prompt="no redis here", seed=9, **QUICK)
        job = wait_for_job(job_id, worker=first)
        assert job.status == "succeeded", (job.error_code, job.error_message)
        assert params_from_png(data_dir / job.result["images"][0])["seed"] == 9
        assert (data_dir / "broker.sqlite").is_file()

        long_id = submit(prompt="interrupted", seed=4, **KILLABLE)
        wait_for_progress(long_id, worker=first)  # mid-sampling
        first.kill()

    with WorkerProcess(model=tiny_model, log_path=tmp_path / "second.log") as second:
        job = wait_for_job(long_id, worker=second)
        assert job.status == "succeeded", (job.error_code, job.error_message)
        assert job.attempts == 2 and job.worker == second.worker_id
        assert "requeued a job whose worker is gone" in second.logs()
