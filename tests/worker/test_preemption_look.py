"""Which queued jobs may pause a run (worker/preemption.py, ``Preemption.look``), on real job records (SQLite) with
the worker's own claim: only an image job above
every job of the run, of the run's model version, and only once it has been seen queued for ``preempt_after_s``
(the clock is the test's: a list of instants, no waiting); never while the worker shuts down."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from echo4o.db import crud, session_scope
from echo4o.settings import get_settings
from worker.outcomes import Claim, claim_job
from worker.preemption import Preemption

SHAPE = {"height": 32, "width": 32, "num_steps": 2}


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    import worker.runtime

    monkeypatch.setenv("ECHO4O_WORKER_HEARTBEAT_S", "60")
    monkeypatch.setenv("ECHO4O_WORKER_SHUTDOWN_GRACE_S", "86400")  # begin_shutdown's timer never fires here
    get_settings.cache_clear()
    rt = worker.runtime.WorkerRuntime()
    rt.register()
    yield rt
    rt.stop()


def queued(priority: int, *, kind: str = "generate", version: str | None = None, params: dict | None = None) -> str:
    settings = get_settings()
    with session_scope(settings.database_url) as s:
        return crud.create_job(session=s, kind=kind, owner="test", priority=priority,
                               model_version=version or settings.model_version,
                               params=params or {"prompt": "a cube", "seed": 1, **SHAPE}).id


class Clock:
    """The instants the preemption reads, one per look."""

    def __init__(self, *instants: float) -> None:
        self.instants = list(instants)

    def __call__(self) -> float:
        return self.instants.pop(0)


def running_run(runtime, priority: int, *, after_s: float = 0.0, clock=None) -> Preemption:  # noqa: ANN001
    """A claimed job of ``priority`` and the preemption of its run."""
    job_id = queued(priority)
    claim = claim_job(job_id, runtime)
    assert isinstance(claim, Claim)
    kwargs = {"clock": clock} if clock is not None else {}
    return Preemption(runtime, runtime.model_version, priority, claim, after_s=after_s, **kwargs)


def look(preemption: Preemption) -> str | None:
    """One look at the queue; the job it found due, if any."""
    with session_scope(get_settings().database_url) as s:
        preemption.look(s)
    return preemption._due if preemption.wanted.is_set() else None  # noqa: SLF001


def test_a_higher_priority_job_of_the_run_version_is_due(runtime) -> None:  # noqa: ANN001
    run = running_run(runtime, 2)
    queued(2)  # the run's own priority: it waits
    queued(0)
    assert look(run) is None
    queued(7)
    more_urgent = queued(9)
    assert look(run) == more_urgent  # the highest first, as the queue delivers


def test_jobs_of_another_version_or_kind_or_with_bad_params_are_not_due(runtime) -> None:  # noqa: ANN001
    run = running_run(runtime, 2)
    queued(9, version="echo4o-other")  # would need the weights swapped mid-run
    queued(9, params={"prompt": "", "seed": 1, **SHAPE})  # fails at its turn: nothing to preempt for
    queued(9, kind="benchmark", params={"suite": "geneval", "limit": 1})  # not an image job
    assert look(run) is None


def test_a_job_is_due_only_once_seen_queued_for_preempt_after_s(runtime) -> None:  # noqa: ANN001
    run = running_run(runtime, 0, after_s=0.25, clock=Clock(10.0, 10.2, 10.3))
    urgent = queued(5)
    assert look(run) is None  # first seen at 10.0
    assert look(run) is None  # 0.2 s queued: an idle worker may still take it
    assert look(run) == urgent  # 0.3 s


def test_a_job_that_left_the_queue_starts_its_wait_again(runtime) -> None:  # noqa: ANN001
    run = running_run(runtime, 0, after_s=0.25, clock=Clock(10.0, 10.2, 10.5, 10.8))
    urgent = queued(5)
    assert look(run) is None
    with session_scope(get_settings().database_url) as s:  # another worker took it
        crud.mark_running(session=s, job_id=urgent, worker="elsewhere:1", gpu=None)
    assert look(run) is None
    with session_scope(get_settings().database_url) as s:  # ... and its worker died: queued again
        crud.requeue_job(session=s, job_id=urgent, attempt=1, worker="elsewhere:1")
    assert look(run) is None  # seen again at 10.5: its wait starts over
    assert look(run) == urgent


def test_a_worker_shutting_down_preempts_no_more(runtime) -> None:  # noqa: ANN001
    run = running_run(runtime, 0)
    queued(9)
    runtime.begin_shutdown()
    assert look(run) is None
