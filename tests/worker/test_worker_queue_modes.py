"""A real `echo4o worker` subprocess on the train queue (no model needed): both broker modes deliver, the
task records its outcome, and the worker reports its lifecycle in `workers`, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from echo4o import queue
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.settings import get_settings
from tests.support.worker_proc import WorkerProcess, wait_for_job


def _finetune_job() -> str:
    upgrade_to_head()
    with session_scope() as s:
        return crud.create_job(session=s, kind="finetune", params={}, model_version="none").id


@pytest.mark.parametrize(("broker", "database"), [("embedded", "sqlite"), ("redis", "postgresql")])
def test_train_queue_round_trip_and_lifecycle(
    broker: str, database: str, request: pytest.FixtureRequest, monkeypatch, tmp_path
) -> None:
    if broker == "redis":
        monkeypatch.setenv("ECHO4O_BROKER_URL", request.getfixturevalue("redis_url"))
    if database == "postgresql":
        monkeypatch.setenv("ECHO4O_DATABASE_URL", request.getfixturevalue("postgres_url"))
    get_settings.cache_clear()
    assert get_settings().embedded_broker is (broker == "embedded")
    queue.ping_broker()
    with WorkerProcess(queues="train", log_path=tmp_path / "worker.log") as worker:
        job_id = _finetune_job()
        assert queue.submit(job_id, "finetune", priority=5) == job_id
        job = wait_for_job(job_id, worker=worker)
        # delivered to the train queue's task and handled: a finetune job without a dataset fails naming it
        assert (job.status, job.error_code) == ("failed", "invalid_params")
        assert "dataset: Field required" in job.error_message
        with session_scope() as s:
            ready = crud.list_ready_workers(session=s, queue="train")
        assert worker.worker_id in [w.id for w in ready]
        assert worker.alive()
    assert worker.status() == "stopped"
    assert "worker stopped" in worker.logs()
