"""A batch that waits for company (``batch_wait_ms``) stops waiting when a queued job that cannot join outranks
it: that job runs next and never waits for a batch it is not part of. The batch still waits for a lower-priority
off-shape job, and takes a higher-priority job of its own shape as a companion, but not a lower-priority one.

On real job records (SQLite) with the worker's own claim; each look at the queue is counted, so whether the lead
waited is seen without a clock: a second look means it waited for more."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import worker.batching
from echo4o.db import crud, session_scope
from echo4o.settings import get_settings
from worker.outcomes import Claim, claim_job, payload_problem

SHAPE = {"height": 32, "width": 32, "num_steps": 2}
OTHER_SHAPE = {"height": 48, "width": 32, "num_steps": 2}


class Waited(Exception):  # noqa: N818 - a signal, not an error
    """The lead looked at the queue a second time: it waited for more companions."""


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    import worker.runtime

    monkeypatch.setenv("ECHO4O_BATCH_MAX_SIZE", "4")
    monkeypatch.setenv("ECHO4O_BATCH_WAIT_MS", "10000")  # the longest wait: only a second look tells it waited
    monkeypatch.setenv("ECHO4O_WORKER_HEARTBEAT_S", "60")
    get_settings.cache_clear()
    rt = worker.runtime.WorkerRuntime()
    rt.register()
    yield rt
    rt.stop()


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the lead's looks at the queue; the second one raises :class:`Waited`."""
    calls: list[int] = []
    real = worker.batching._claim_compatible  # noqa: SLF001

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) > 1:
            raise Waited
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.batching, "_claim_compatible", counted)
    return calls


def queued(priority: int, shape: dict, prompt: str = "a cube") -> str:
    with session_scope(get_settings().database_url) as s:
        return crud.create_job(session=s, kind="generate", owner="test", priority=priority,
                               model_version=get_settings().model_version,
                               params={"prompt": prompt, "seed": 1, **shape}).id


def status(job_id: str) -> str:
    with session_scope(get_settings().database_url) as s:
        return crud.get_job(session=s, job_id=job_id).status


def gather(runtime, lead_id: str) -> list[str]:  # noqa: ANN001
    """The lead claimed as a worker claims it, then its companions gathered; their ids."""
    claim = claim_job(lead_id, runtime)
    assert isinstance(claim, Claim)
    with session_scope(get_settings().database_url) as s:
        job = crud.get_job(session=s, job_id=lead_id)
        s.expunge(job)
    payload, problem = payload_problem(job.kind, job.params)
    assert problem is None
    members = worker.batching.gather_companions(job, payload, runtime.model_version, claim, runtime)
    return [m.claim.job_id for m in members]


def test_a_higher_priority_off_shape_job_ends_the_wait(runtime, looks: list[int]) -> None:  # noqa: ANN001
    lead, companion = queued(5, SHAPE), queued(5, SHAPE, "a sphere")
    urgent = queued(9, OTHER_SHAPE)
    assert gather(runtime, lead) == [companion]  # one look, no wait: the urgent job is next
    assert len(looks) == 1
    assert (status(companion), status(urgent)) == ("running", "queued")


def test_a_lower_priority_off_shape_job_does_not_end_the_wait(runtime, looks: list[int]) -> None:  # noqa: ANN001
    lead, _ = queued(5, SHAPE), queued(5, SHAPE, "a sphere")
    queued(1, OTHER_SHAPE)
    with pytest.raises(Waited):
        gather(runtime, lead)


def test_a_higher_priority_job_of_the_same_shape_joins_and_the_wait_goes_on(runtime, looks) -> None:  # noqa: ANN001
    lead, companion = queued(5, SHAPE), queued(5, SHAPE, "a sphere")
    urgent = queued(9, SHAPE, "a cone")
    with pytest.raises(Waited):
        gather(runtime, lead)
    assert (status(companion), status(urgent)) == ("running", "running")


def test_a_lower_priority_job_of_the_same_shape_does_not_join(runtime, looks: list[int]) -> None:  # noqa: ANN001
    lead, companion = queued(5, SHAPE), queued(5, SHAPE, "a sphere")
    background = queued(1, SHAPE, "a benchmark image")  # a batch never slows its lead for jobs the lead outranks
    with pytest.raises(Waited):
        gather(runtime, lead)
    assert (status(companion), status(background)) == ("running", "queued")
    looks.clear()
    assert gather(runtime, background) == []  # on its own turn, alone: nothing of its priority or above is queued
    assert status(background) == "running"
