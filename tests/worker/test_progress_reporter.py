"""The worker's progress reporter on real databases: the sampling loop hands steps over without a database
call, the row ends at the last step reported, a preview survives coalescing, and a cancel request reaches
the flag the step callback checks (through a progress write, and through the idle poll)."""

from __future__ import annotations

from pathlib import Path

import pytest

from echo4o.db import crud, session_scope, upgrade_to_head
from worker.tasks import ProgressReporter

# generous: the flag is set by a background thread on a shared machine; no timing is asserted
EVENT_WAIT_S = 60


def _running_job(url: str) -> str:
    upgrade_to_head(url)
    with session_scope(url) as s:
        job = crud.create_job(session=s, kind="generate", params={"prompt": "p"}, model_version="test")
        assert crud.mark_running(session=s, job_id=job.id, worker="test:1", gpu=None)
        return job.id


def _row(url: str, job_id: str):
    with session_scope(url) as s:
        return crud.get_job(session=s, job_id=job_id)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    return request.getfixturevalue("postgres_url")


def test_last_step_and_preview_are_in_the_row_after_close(db_url: str) -> None:
    job_id = _running_job(db_url)
    reporter = ProgressReporter(db_url, job_id)
    reporter.report(1, 50, b"preview-1")
    for step in range(2, 51):
        reporter.report(step, 50)
    reporter.close()
    row = _row(db_url, job_id)
    assert (row.progress_step, row.progress_total, row.progress_stage) == (50, 50, "sampling")
    assert row.preview == b"preview-1"  # kept while later steps without a preview were coalesced
    assert 1 <= reporter.writes <= 50
    assert not reporter.cancelled.is_set()


def test_cancel_request_sets_the_flag_through_a_write_and_through_the_idle_poll(db_url: str) -> None:
    job_id = _running_job(db_url)
    with session_scope(db_url) as s:
        crud.request_cancel(session=s, job_id=job_id)
    reporter = ProgressReporter(db_url, job_id)
    reporter.report(1, 10)
    assert reporter.cancelled.wait(EVENT_WAIT_S)
    reporter.close()

    job_id = _running_job(db_url)
    reporter = ProgressReporter(db_url, job_id, poll_s=0.05)
    try:
        with session_scope(db_url) as s:
            crud.request_cancel(session=s, job_id=job_id)
        assert reporter.cancelled.wait(EVENT_WAIT_S)  # no step reported: the poll saw it
    finally:
        reporter.close()
