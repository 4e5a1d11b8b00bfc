"""A long job's progress detail (a training run's loss and lr, a benchmark's counts) travels from the worker's
progress reporter through the job row to the job view and the event stream, with its stage; a new stage counts
its steps from 1 again."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

from backend.services.events import StepCounter, job_events
from backend.services.views import public_job
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.jobs import PAUSED_STAGE
from echo4o.settings import get_settings
from worker.progress import ProgressReporter


def _running_job(url: str, kind: str, params: dict) -> str:
    """A job of ``kind`` claimed by a worker (``running``); its id."""
    upgrade_to_head(url)
    with session_scope(url) as s:
        job = crud.create_job(session=s, kind=kind, params=params, model_version="v1")
        assert crud.mark_running(session=s, job_id=job.id, worker="test:1", gpu=None)
        return job.id


def test_detail_and_stage_reach_the_view_and_the_event_stream():
    settings = get_settings()
    url = settings.database_url
    job_id = _running_job(url, "finetune", {})

    with ProgressReporter(url, job_id) as reporter:
        reporter.report(3, 10, stage="train", detail={"loss": 0.5, "lr": 2e-5})
    with session_scope(url) as s:
        row = crud.get_job(session=s, job_id=job_id)
        assert row.progress_stage == "train" and row.progress_step == 3
        assert row.progress_detail == {"loss": 0.5, "lr": 2e-5}
        view = public_job(s, row, "http://test")
        assert view.progress.detail == {"loss": 0.5, "lr": 2e-5} and view.progress.stage == "train"


def _run(fn, *args):
    """Run the async ``fn(*args)`` on a thread of its own: a session's browser tests keep an event loop running on
    the main thread (Playwright's sync API), where ``asyncio.run`` is refused."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn(*args))).result()


def _events_of(follow, kind: str, params: dict) -> list[dict]:
    """Every event of a new running job of ``kind`` while the async ``follow(settings, url, job_id)`` moves it."""
    settings = get_settings()
    job_id = _running_job(settings.database_url, kind, params)
    return _run(follow, settings, settings.database_url, job_id)


class _Follower:
    """One job's event stream read while the test moves the job: its events are kept in order."""

    def __init__(self, settings, url: str, job_id: str) -> None:
        self.url, self.job_id = url, job_id
        self.stream = job_events(settings, job_id, "http://test")
        self.events: list[dict] = []

    def write(self, step: int, total: int, stage: str, detail: dict | None = None) -> None:
        with session_scope(self.url) as s:
            crud.update_progress(session=s, job_id=self.job_id, step=step, total=total, stage=stage, detail=detail)

    async def until(self, name: str, step: int | None = None) -> None:
        """Read events until one named ``name`` (of ``step``, when given) has come."""
        while True:
            event = await anext(self.stream)
            self.events.append(event)
            if event["event"] == name and (step is None or json.loads(event["data"])["step"] == step):
                return

    async def succeed(self) -> list[dict]:
        """End the job as succeeded, read the stream to its end; every event it sent."""
        with session_scope(self.url) as s:
            assert crud.mark_succeeded(session=s, job_id=self.job_id, result={"images": []})
        self.events.extend([event async for event in self.stream])
        return self.events


async def _follow(settings, url: str, job_id: str) -> list[dict]:
    """Read the stream while the job moves: 3 steps of "generate", then 2 of "judge", then it succeeds."""
    f = _Follower(settings, url, job_id)
    f.write(3, 3, "generate", {"generated": 3})
    await f.until("progress", 3)
    f.write(2, 4, "judge", {"judged": 2})
    await f.until("progress", 2)
    return await f.succeed()


def test_a_new_stage_counts_from_one_and_success_replays_nothing():
    events = _events_of(_follow, "benchmark", {})
    progress = [json.loads(e["data"]) for e in events if e["event"] == "progress"]
    assert [(p["stage"], p["step"], p["total"]) for p in progress] == [
        ("generate", 1, 3), ("generate", 2, 3), ("generate", 3, 3), ("judge", 1, 4), ("judge", 2, 4)]
    assert progress[2]["detail"] == {"generated": 3} and progress[4]["detail"] == {"judged": 2}
    assert "detail" not in progress[0]
    assert events[-1]["event"] == "done"


async def _follow_image_job(settings, url: str, job_id: str) -> list[dict]:
    """Sampling reaches 4/4, then the job moves to its encoding stage at the same step, then succeeds."""
    f = _Follower(settings, url, job_id)
    f.write(4, 4, "sampling")
    await f.until("progress", 4)
    f.write(4, 4, "encoding")
    return await f.succeed()


def test_a_stage_that_goes_on_counting_repeats_no_step():
    events = _events_of(_follow_image_job, "generate", {"prompt": "p"})
    steps = [json.loads(e["data"])["step"] for e in events if e["event"] == "progress"]
    assert steps == [1, 2, 3, 4] and events[-1]["event"] == "done"


def test_step_counter_repeats_nothing_when_a_phase_goes_on_and_restarts_when_it_counts_anew():
    c = StepCounter()
    assert list(c.advance("queued", "queued", 0, None)) == []
    assert list(c.advance("running", "sampling", 2, 4)) == [1, 2]
    assert list(c.advance("running", "sampling", 4, 4)) == [3, 4]
    assert list(c.advance("running", "encoding", 4, 4)) == []  # same count goes on: nothing again
    assert list(c.advance("succeeded", "done", 4, 4)) == []
    b = StepCounter()
    assert list(b.advance("running", "generate", 3, 3)) == [1, 2, 3]
    assert list(b.advance("running", "judge", 1, 3)) == [1]  # the step went back: a new count
    assert list(b.advance("running", "judge", 3, 3)) == [2, 3]
    d = StepCounter()
    assert list(d.advance("running", "generate", 2, 2)) == [1, 2]
    assert list(d.advance("running", "judge", 5, 6)) == [1, 2, 3, 4, 5]  # another total: a new count


async def _follow_paused_job(settings, url: str, job_id: str) -> list[dict]:
    """Sampling reaches 2/5, pauses there for a preempting job, goes on to 5/5, then the job succeeds."""
    f = _Follower(settings, url, job_id)
    f.write(2, 5, "sampling")
    await f.until("progress", 2)
    f.write(2, 5, PAUSED_STAGE, {"preempted_by": "urgent-job"})
    await f.until("paused")
    f.write(5, 5, "sampling")
    await f.until("progress", 5)
    return await f.succeed()


def test_a_pause_is_one_event_and_the_steps_go_on_in_order():
    events = _events_of(_follow_paused_job, "generate", {"prompt": "p"})
    names = [e["event"] for e in events]
    assert names == ["progress", "progress", "paused", "progress", "progress", "progress", "done"]
    assert json.loads(events[2]["data"]) == {"step": 2, "total": 5, "preempted_by": "urgent-job"}
    assert "id" not in events[2]
    assert [json.loads(e["data"])["stage"] for e in events if e["event"] == "progress"] == ["sampling"] * 5
