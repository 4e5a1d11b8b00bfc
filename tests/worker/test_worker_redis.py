"""Jobs through real Redis into a real `echo4o worker` subprocess running the tiny model: one stack for the
module (its own data dir, Redis database and worker). Each test starts with the worker idle and no job
waiting, and leaves it so (``settle_jobs``), whatever order the tests run in."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from echo4o.db import crud, session_scope
from echo4o.db.models import Worker
from echo4o.pnginfo import params_from_png
from tests.support.worker_proc import POLL_S, WAIT_S, WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import (
    QUICK,
    UNTIL_CANCELLED,
    cancel,
    job_row,
    private_redis_url,
    submit,
    submit_raw,
    worker_env,
)


def _heartbeat(worker_id: str):
    with session_scope() as s:
        return s.get(Worker, worker_id, populate_existing=True).heartbeat_at


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, str]:
    url = private_redis_url(offset=7)
    return worker_env(tmp_path_factory.mktemp("redis-stack"), tiny_model, ECHO4O_BROKER_URL=url)


def test_generate_succeeds_with_png_params_progress_and_timings(stack, module_worker: WorkerProcess) -> None:
    data_dir = Path(stack["ECHO4O_DATA_DIR"])
    job_id = submit(prompt="a red cube", seed=1234, num_images=2, **QUICK)
    job = wait_for_job(job_id, worker=module_worker)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert job.result["images"] == [f"results/{job_id}/0.png", f"results/{job_id}/1.png"]
    assert job.result["seed"] == 1234
    assert set(job.result["timings"]) >= {"queue_wait_s", "sampling_s", "encoding_s", "total_s"}
    assert job.worker == module_worker.worker_id and job.gpu == "cpu" and job.attempts == 1
    assert job.progress_total and job.progress_step == job.progress_total  # every step was recorded
    assert job.preview is not None and job.preview.startswith(b"\x89PNG")
    assert job.started_at >= job.created_at and job.finished_at >= job.started_at

    for n, rel in enumerate(job.result["images"]):
        path = data_dir / rel
        with Image.open(path) as img:
            assert img.size == (32, 32)
        params = params_from_png(path)
        assert params["prompt"] == "a red cube" and params["seed"] == 1234 and params["num_steps"] == 3
        assert params["image_index"] == n and params["num_images"] == 2
    assert not [p for p in (data_dir / "results" / job_id).iterdir() if p.name.startswith(".")]  # no temp files

    # the parameters in a PNG's text chunks regenerate the same image
    params = params_from_png(data_dir / job.result["images"][0])
    again = submit(prompt=params["prompt"], seed=params["seed"], num_steps=params["num_steps"],
                   height=params["height"], width=params["width"], num_images=params["num_images"])
    again_job = wait_for_job(again, worker=module_worker)
    assert again_job.status == "succeeded"
    with Image.open(data_dir / job.result["images"][0]) as a, Image.open(data_dir / again_job.result["images"][0]) as b:
        assert a.tobytes() == b.tobytes()


def test_multiref_with_two_references(stack, module_worker: WorkerProcess) -> None:
    data_dir = Path(stack["ECHO4O_DATA_DIR"])
    (data_dir / "uploads" / "refs").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), (220, 30, 30)).save(data_dir / "uploads" / "refs" / "0.png")
    Image.new("RGB", (32, 48), (30, 30, 220)).save(data_dir / "uploads" / "refs" / "1.png")
    job_id = submit(
        "multiref", prompt="put them together", references=["uploads/refs/0.png", "uploads/refs/1.png"],
        num_steps=3, height=32, width=32, seed=5,
    )
    job = wait_for_job(job_id, worker=module_worker)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    params = params_from_png(data_dir / job.result["images"][0])
    assert params["num_references"] == 2 and params["prompt"] == "put them together"


def test_cancel_a_queued_and_a_running_job(stack, module_worker: WorkerProcess) -> None:
    running = submit(prompt="long", **UNTIL_CANCELLED)
    queued = submit(prompt="waits behind it", **QUICK)
    wait_for_progress(running, worker=module_worker)  # mid-sampling

    deadline = time.monotonic() + WAIT_S  # `busy` is written by the worker's heartbeat thread as the job starts
    while module_worker.status() != "busy":
        assert module_worker.alive() and time.monotonic() < deadline, module_worker.status()
        time.sleep(POLL_S)
    # one worker, prefetch 1: the second job is still waiting in Redis, so it is cancelled at once
    row = cancel(queued)
    assert row.status == "cancelled" and row.finished_at is not None
    # the running job stops at its next step
    row = cancel(running)
    assert row.cancel_requested
    job = wait_for_job(running, worker=module_worker)
    assert job.status == "cancelled" and job.result is None
    assert 1 <= job.progress_step < job.progress_total

    after = submit(prompt="next", **QUICK)  # FIFO: the cancelled message is consumed before this one
    assert wait_for_job(after, worker=module_worker).status == "succeeded"
    row = job_row(queued)
    assert row.status == "cancelled" and row.attempts == 0 and row.started_at is None  # it never ran


def test_higher_priority_runs_first_in_the_order_queue_position_reports(stack, module_worker: WorkerProcess) -> None:
    blocker = submit(prompt="blocker", **UNTIL_CANCELLED)
    wait_for_job(blocker, statuses=("running",), worker=module_worker)
    # while it runs the worker takes nothing more (prefetch 1), so these wait in Redis's priority lists
    low = submit(prompt="low", priority=0, **QUICK)
    mid = submit(prompt="mid", **QUICK)
    high = submit(prompt="high", priority=9, **QUICK)
    with session_scope() as s:
        positions = [crud.queue_position(session=s, job_id=j) for j in (high, mid, low)]
    assert job_row(blocker).status == "running"  # so all three were waiting together
    assert positions == [0, 1, 2]
    cancel(blocker)  # no need to wait for it
    rows = [wait_for_job(j, worker=module_worker) for j in (high, mid, low)]
    assert [r.status for r in rows] == ["succeeded"] * 3
    assert rows[0].started_at < rows[1].started_at < rows[2].started_at


def test_bad_payloads_fail_the_job_and_the_worker_keeps_serving(stack, module_worker: WorkerProcess) -> None:
    # a payload the gateway would refuse (stored by an older gateway or edited in the database)
    bad = submit_raw("generate", {"prompt": "", "num_steps": 0, "height": 33, "width": 32})
    job = wait_for_job(bad, worker=module_worker)
    assert (job.status, job.error_code) == ("failed", "invalid_params")
    for field in ("prompt", "num_steps", "height"):
        assert field in job.error_message
    # valid payload, but the engine refuses it (its reference file is gone): ValueError naming the field
    missing = submit("multiref", prompt="x", references=["uploads/nowhere/0.png"], **QUICK)
    job = wait_for_job(missing, worker=module_worker)
    assert (job.status, job.error_code) == ("failed", "invalid_params")
    assert "references.0" in job.error_message
    # a model version this worker does not serve
    other = submit(prompt="x", model_version="someone-else", **QUICK)
    job = wait_for_job(other, worker=module_worker)
    assert (job.status, job.error_code) == ("failed", "model_unavailable")

    # the last job ended: the worker marks the job, then itself ready (a heartbeat never writes back a stale status)
    deadline = time.monotonic() + WAIT_S
    while module_worker.status() != "ready":
        assert module_worker.alive() and time.monotonic() < deadline, module_worker.status()
        time.sleep(POLL_S)
    assert module_worker.logs().count("worker.engine.pipeline: model loaded") == 1  # once per process, not per job
    # the heartbeat keeps moving (every ECHO4O_WORKER_HEARTBEAT_S = 1 s here)
    first = _heartbeat(module_worker.worker_id)
    deadline = time.monotonic() + WAIT_S  # generous: a loaded core delays the heartbeat thread
    while _heartbeat(module_worker.worker_id) <= first:
        assert module_worker.alive(), module_worker.tail()
        assert time.monotonic() < deadline, f"the worker's heartbeat did not advance in {WAIT_S} s"
        time.sleep(POLL_S)  # pacing of the poll; the loop waits for the row to change
    ok = submit(prompt="still serving", **QUICK)
    job = wait_for_job(ok, worker=module_worker)
    assert job.status == "succeeded" and job.worker == module_worker.worker_id
