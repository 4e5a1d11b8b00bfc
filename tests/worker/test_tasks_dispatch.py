"""Task dispatch by job kind (worker.tasks.JOB_HANDLERS), in process on the test's SQLite records: every kind
has a handler of its own (none is the not_supported fallback): image kinds run the pipeline, finetune its
trainer."""

from __future__ import annotations

import pytest

from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.jobs import IMAGE_KINDS, JOB_KINDS
from worker.tasks import JOB_HANDLERS, execute_image_job, execute_job
from worker.training.job import execute_finetune_job


def test_every_job_kind_has_a_handler_and_image_kinds_run_the_pipeline() -> None:
    assert set(JOB_HANDLERS) == set(JOB_KINDS)
    assert [kind for kind, handler in JOB_HANDLERS.items() if handler is execute_image_job] == list(IMAGE_KINDS)
    assert not [kind for kind, handler in JOB_HANDLERS.items() if handler.__name__ == "fail_unsupported"]


def test_a_message_without_a_job_row_is_dropped() -> None:
    upgrade_to_head()
    assert execute_job("0" * 32) == "missing"


def test_a_finetune_job_runs_its_own_handler_and_bad_params_fail_naming_the_field() -> None:
    assert JOB_HANDLERS["finetune"] is execute_finetune_job
    upgrade_to_head()
    with session_scope() as s:
        job_id = crud.create_job(session=s, kind="finetune", params={"steps": 0}, model_version="none").id
    assert execute_job(job_id) == "failed"
    with session_scope() as s:
        row = crud.get_job(session=s, job_id=job_id)
    assert (row.status, row.error_code) == ("failed", "invalid_params")
    assert "dataset: Field required" in row.error_message and "steps: Input should be greater than or equal to 1" \
        in row.error_message


def test_a_handler_that_raises_fails_its_job_instead_of_leaving_it_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a handler (here injected) used to escape to Celery, which acked the message: the row stayed queued
    and a client holding ``?wait`` waited it out."""
    def crashing(job_id: str, *, redelivered: bool = False, row: object = None) -> str:
        raise KeyError("boom")

    monkeypatch.setitem(JOB_HANDLERS, "generate", crashing)
    upgrade_to_head()
    with session_scope() as s:
        job_id = crud.create_job(session=s, kind="generate", params={"prompt": "a red cube"}, model_version="m").id
    assert execute_job(job_id) == "failed"
    with session_scope() as s:
        row = crud.get_job(session=s, job_id=job_id)
    assert (row.status, row.error_code) == ("failed", "worker_error")
    assert "KeyError: 'boom'" in row.error_message and "submit it again" in row.error_message
