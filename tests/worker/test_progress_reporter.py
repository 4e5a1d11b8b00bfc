"""The worker's progress reporter on real databases: no database statement runs on the sampling thread (an
engine event listener records the thread of every statement), the row ends at the last step reported, a
preview survives coalescing, and a cancel request reaches the flag the step callback checks (through a
progress write, and through the idle poll)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.db.session import create_db_engine
from tests.support.statements import recorded_statements
from worker.progress import ProgressReporter
from worker.tasks import JobCancelled, step_callback

# generous: the events come from a background thread on a shared machine; no timing is asserted
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


def _request_cancel_elsewhere(url: str, job_id: str) -> None:
    """Request a cancel through an engine of its own (as the gateway would), unseen by the shared engine's
    listeners."""
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE jobs SET cancel_requested = :yes WHERE id = :id"), {"yes": True, "id": job_id})
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    return request.getfixturevalue("postgres_url")


def test_no_database_statement_runs_on_the_sampling_thread(db_url: str) -> None:
    job_id = _running_job(db_url)  # set-up statements run here, before the recording starts
    sampling_thread = threading.get_ident()
    last: dict = {"step": 0, "total": None}
    preview = Image.new("RGB", (32, 32), (10, 200, 10))

    with recorded_statements(db_url) as log, ProgressReporter(db_url, job_id) as reporter:
        on_step = step_callback(job_id, reporter, time.monotonic() + 3600, last)
        on_step(1, 40, preview)
        assert log.first_update.wait(EVENT_WAIT_S), "the reporter wrote no progress"
        for step in range(2, 30):  # faster than the 50 ms write cap: coalesced, still never written from here
            on_step(step, 40, preview if step % 5 == 0 else None)
        _request_cancel_elsewhere(db_url, job_id)
        on_step(30, 40)  # its write reads the cancel request
        assert reporter.cancelled.wait(EVENT_WAIT_S), "the cancel request never reached the flag"
        with pytest.raises(JobCancelled):
            on_step(31, 40)

    assert log.statements, "the listener saw no statement: it is not on the engine the reporter uses"
    assert sampling_thread not in log.threads(), [sql for t, sql in log.statements if t == sampling_thread]
    assert log.threads() == {reporter.thread_ident}
    assert log.updates_on(reporter.thread_ident) >= 2  # step 1, then at least the one that saw the cancel
    assert last == {"step": 31, "total": 40}
    row = _row(db_url, job_id)
    assert row.progress_step == 31 and row.preview is not None and row.preview.startswith(b"\x89PNG")


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


def test_cancel_request_sets_the_flag_through_a_write(db_url: str) -> None:
    job_id = _running_job(db_url)
    with session_scope(db_url) as s:
        crud.request_cancel(session=s, job_id=job_id)
    # no idle poll within the test's wait: only the progress write can see the request
    with ProgressReporter(db_url, job_id, poll_s=3600) as reporter:
        reporter.report(1, 10)
        assert reporter.cancelled.wait(EVENT_WAIT_S)
    assert reporter.writes >= 1


def test_cancel_request_sets_the_flag_through_the_idle_poll(db_url: str) -> None:
    job_id = _running_job(db_url)
    with ProgressReporter(db_url, job_id, poll_s=0.05) as reporter:
        with session_scope(db_url) as s:
            crud.request_cancel(session=s, job_id=job_id)
        assert reporter.cancelled.wait(EVENT_WAIT_S)  # no step reported: the poll saw it
    assert reporter.writes == 0


def test_the_write_interval_comes_from_the_setting_and_coalesces_the_steps_in_between(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from echo4o.settings import get_settings

    monkeypatch.setenv("ECHO4O_PROGRESS_INTERVAL_S", "10")  # no second write can come before close
    get_settings.cache_clear()  # the autouse settings fixture clears it again afterwards
    job_id = _running_job(db_url)
    with ProgressReporter(db_url, job_id) as reporter:
        assert reporter.min_interval_s == 10
        reporter.report(1, 9)
        deadline = time.monotonic() + EVENT_WAIT_S
        while reporter.writes < 1 and time.monotonic() < deadline:  # the first step is written at once
            time.sleep(0.01)
        assert reporter.writes == 1 and _row(db_url, job_id).progress_step == 1
        for step in range(2, 6):
            reporter.report(step, 9)
    assert reporter.writes == 2  # steps 2-5 in one write, at close
    assert _row(db_url, job_id).progress_step == 5


def test_a_stage_start_does_not_hold_back_the_first_step(db_url: str) -> None:
    """The worker writes a job's `sampling` stage (step 0) through the reporter as the pipeline starts; the first
    step still shows at once, not a whole write interval later."""
    job_id = _running_job(db_url)
    with ProgressReporter(db_url, job_id, min_interval_s=10 * EVENT_WAIT_S) as reporter:
        reporter.report(0, None, stage="sampling")
        deadline = time.monotonic() + EVENT_WAIT_S
        while reporter.writes < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reporter.writes == 1 and _row(db_url, job_id).progress_stage == "sampling"
        reporter.report(1, 9)
        deadline = time.monotonic() + EVENT_WAIT_S
        while reporter.writes < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reporter.writes == 2 and _row(db_url, job_id).progress_step == 1  # long before the interval
