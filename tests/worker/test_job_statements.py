"""The database statements an image job costs on the worker's own thread, between the message and the answer.

Each statement is a round trip (and each write a commit) on the serving path of every job, which on a small
machine costs milliseconds (docs/performance.md, "Serving overhead"). The worker runs in this process on the
test's SQLite records and the tiny model; the progress reporter's and the heartbeat's threads are not counted
(the reporter's writes follow the clock, and so do the heartbeat's)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.jobs import parse_job
from echo4o.settings import get_settings
from tests.support.statements import recorded_statements

#: Statements of one job on the worker's thread, from its message (``execute_job``): read the row (once: the
#: handler gets the row that chose it), claim it (one UPDATE ... RETURNING the attempt and timestamps), look for
#: batch companions, the result. The progress reporter's thread writes the stages
#: `sampling` and (with the last step) `encoding`, the heartbeat's thread the worker's status `busy` and `ready`,
#: and the queue wait comes with the claim (each was a statement on this thread before: 10 in all).
STATEMENTS_PER_JOB = 4


@pytest.fixture
def runtime(tiny_model: Path, monkeypatch: pytest.MonkeyPatch):
    import worker.runtime

    monkeypatch.setenv("ECHO4O_MODEL", str(tiny_model))
    monkeypatch.setenv("ECHO4O_DEVICE", "cpu")
    monkeypatch.setenv("ECHO4O_WORKER_HEARTBEAT_S", "60")
    get_settings.cache_clear()
    rt = worker.runtime.WorkerRuntime()
    rt.register()
    rt.load()
    rt.set_status("ready")
    monkeypatch.setattr(worker.runtime, "_runtime", rt)
    yield rt
    rt.stop()


def test_an_image_job_costs_a_fixed_number_of_statements_on_the_workers_thread(runtime) -> None:  # noqa: ANN001
    from worker.tasks import execute_job

    upgrade_to_head()
    payload = parse_job("generate", {"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 3})

    def submit() -> str:
        with session_scope() as s:
            return crud.create_job(session=s, kind="generate", params=payload.model_dump(mode="json"),
                                   model_version=get_settings().model_version).id

    execute_job(submit())  # the first job warms up what is loaded lazily
    job_id = submit()
    with recorded_statements(get_settings().database_url) as log:
        outcome = execute_job(job_id)
    statements = [" ".join(sql.split())[:90] for sql in log.on(threading.get_ident())]

    assert outcome == "succeeded"
    assert len(statements) == STATEMENTS_PER_JOB, "\n".join(statements)
    with session_scope() as s:
        row = crud.get_job(session=s, job_id=job_id)
    assert row.result["timings"]["queue_wait_s"] == round((row.started_at - row.created_at).total_seconds(), 4)
    assert row.progress_step == row.progress_total == 2
