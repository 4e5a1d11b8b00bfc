"""The worker's status row: a job's `busy` and `ready` are written by the heartbeat's thread (off the job's serving
path) as soon as they are set, not at the next beat, and nothing is written after `stopped`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from echo4o.db import session_scope
from echo4o.db.models import Worker
from echo4o.settings import get_settings
from tests.support.statements import recorded_statements
from tests.support.worker_proc import POLL_S, WAIT_S

#: How long a status change may take to reach the row: generous for a loaded machine, and half the heartbeat's
#: interval (60 s, the longest allowed), so that a change written only by the next beat fails the test.
STATUS_WAIT_S = 30.0


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    import worker.runtime

    monkeypatch.setenv("ECHO4O_WORKER_HEARTBEAT_S", "60")  # the longest beat (see STATUS_WAIT_S)
    get_settings.cache_clear()
    rt = worker.runtime.WorkerRuntime()
    rt.register()
    rt.set_status("ready")
    yield rt
    rt.stop()


def row_status(worker_id: str) -> str:
    with session_scope() as s:
        return s.get(Worker, worker_id).status


def wait_for_status(worker_id: str, status: str) -> None:
    deadline = time.monotonic() + STATUS_WAIT_S

    while row_status(worker_id) != status:
        assert time.monotonic() < deadline, f"status {row_status(worker_id)!r}, never {status!r}"
        time.sleep(POLL_S)


def test_a_status_set_later_is_written_by_the_heartbeat_thread_at_once(runtime) -> None:  # noqa: ANN001
    with recorded_statements(get_settings().database_url) as log:
        runtime.set_status("busy", now=False)
        wait_for_status(runtime.worker_id, "busy")
        runtime.set_status("ready", now=False)
        wait_for_status(runtime.worker_id, "ready")
    writes = [sql for sql in log.on(threading.get_ident()) if not sql.lstrip().upper().startswith("SELECT")]
    assert writes == []  # none of the writes was on this thread (the reads are the test's polls)
    assert runtime._beat.is_alive()  # noqa: SLF001 - the beat goes on after the writes


def test_nothing_is_written_after_stopped(runtime) -> None:  # noqa: ANN001
    runtime.set_status("busy", now=False)
    runtime.stop()  # a `busy` not yet written is not written after this
    assert row_status(runtime.worker_id) == "stopped"
    runtime._beat.join(WAIT_S)  # noqa: SLF001 - the heartbeat's thread ends with the worker
    assert not runtime._beat.is_alive()  # noqa: SLF001
    runtime.set_status("ready", now=False)  # a job that ends after the stop
    runtime.set_status("ready")
    assert row_status(runtime.worker_id) == "stopped"
