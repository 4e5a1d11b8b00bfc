"""A worker SIGKILLed mid-job: late acks keep the job's message unacknowledged in Redis, and once the
visibility timeout (short here, through settings) has passed another worker runs it to the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from echo4o.settings import get_settings
from tests.support.worker_proc import WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import KILLABLE, private_redis_url, submit, use_env, worker_env

JOB_TIMEOUT_S = 60  # the rerun must fit in it on a loaded CPU; Redis redelivers after JOB_TIMEOUT_S + 1


def test_killed_worker_job_is_redelivered_to_another(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = worker_env(
        tmp_path / "data",
        tiny_model,
        ECHO4O_BROKER_URL=private_redis_url(offset=11),
        ECHO4O_JOB_TIMEOUT_S=str(JOB_TIMEOUT_S),
        ECHO4O_BROKER_VISIBILITY_TIMEOUT_S=str(JOB_TIMEOUT_S + 1),
    )
    use_env(monkeypatch, env)
    assert get_settings().broker_visibility_timeout_s == JOB_TIMEOUT_S + 1

    with WorkerProcess(model=tiny_model, log_path=tmp_path / "victim.log") as victim:
        job_id = submit(prompt="redelivered", seed=3, **KILLABLE)
        job = wait_for_progress(job_id, worker=victim)  # mid-sampling
        assert job.worker == victim.worker_id
        victim.kill()

    # started after the kill: the job's only way to this worker is redelivery by the broker
    with WorkerProcess(model=tiny_model, log_path=tmp_path / "rescuer.log") as rescuer:
        job = wait_for_job(job_id, worker=rescuer)
        assert job.status == "succeeded", (job.error_code, job.error_message)
        assert job.attempts == 2 and job.worker == rescuer.worker_id
        assert (tmp_path / "data" / job.result["images"][0]).is_file()
