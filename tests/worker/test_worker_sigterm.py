"""SIGTERM on a busy worker (real Redis workers): the job finishes when it ends within the shutdown grace period;
past it, the job is put back to ``queued`` and sent again, the worker exits, and another worker runs the job to the
end, once. Either way the worker's row ends ``stopped``."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from echo4o.jobs import MAX_STEPS
from tests.support.worker_proc import WAIT_S, WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import KILLABLE, use_env, worker_env
from tests.worker.jobs_support import submit as submit_job

#: A job still sampling when the signal comes, and short enough to run again whole.
STEPS = MAX_STEPS


def _sigterm(worker: WorkerProcess) -> int:
    """SIGTERM, then the exit code (a grace period past WAIT_S fails the test through the timeout)."""
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    return worker.proc.wait(timeout=WAIT_S)


@pytest.fixture
def workers(tmp_path: Path, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch,
            request: pytest.FixtureRequest) -> Iterator[list[WorkerProcess]]:
    """``request.param``: (how many workers, their grace period in seconds), on Redis."""
    count, grace = request.param
    use_env(monkeypatch, worker_env(tmp_path / "data", tiny_model, ECHO4O_BROKER_URL=redis_url,
                                    ECHO4O_WORKER_SHUTDOWN_GRACE_S=str(grace)))
    started = [WorkerProcess(model=tiny_model, log_path=tmp_path / f"w{n}.log").start() for n in range(count)]
    try:
        for w in started:
            w.wait_ready()
        yield started
    finally:
        for w in started:
            w.stop()


# grace 0: the requeue follows the SIGTERM at once, whatever the machine's speed (a 0.5 s grace let a
# 40-step job finish first on a quiet machine, and the test then saw no requeue)
@pytest.mark.parametrize("workers", [(2, 0)], indirect=True)
def test_sigterm_past_the_grace_period_requeues_the_job_and_another_worker_runs_it(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    job_id = submit_job(prompt="sigterm requeue", seed=2, **{**KILLABLE, "num_steps": STEPS})
    job = wait_for_progress(job_id)
    busy, other = workers if job.worker == workers[0].worker_id else workers[::-1]

    assert _sigterm(busy) == 0
    assert busy.status() == "stopped"
    assert "job requeued" in busy.logs() and "the worker stops (grace period over)" in busy.logs()

    job = wait_for_job(job_id, worker=other)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert (job.attempts, job.worker) == (2, other.worker_id)
    assert sorted(p.name for p in (tmp_path / "data" / "results" / job_id).iterdir()) == ["0.png"]


@pytest.mark.parametrize("workers", [(1, 3600)], indirect=True)
def test_sigterm_within_the_grace_period_lets_the_job_finish(workers: list[WorkerProcess]) -> None:
    (worker,) = workers
    job_id = submit_job(prompt="sigterm finish", seed=3, **{**KILLABLE, "num_steps": 8})
    wait_for_progress(job_id, worker=worker)

    assert _sigterm(worker) == 0
    assert worker.status() == "stopped"
    job = wait_for_job(job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert (job.attempts, job.worker) == (1, worker.worker_id)
