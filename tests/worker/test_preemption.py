"""Priority preemption (worker/preemption.py) through real Redis into a real `echo4o worker` subprocess running the
tiny model: a job of a higher priority, submitted while the worker samples lower-priority jobs, runs between two
of their steps and finishes first; the paused jobs then finish with the images they make uninterrupted, their
results naming the pause; a job of the running job's own priority waits for it; a batch is paused as a whole.

Every wait is for a job's state (its row), never for time. ``ECHO4O_PREEMPT_AFTER_S=0`` here: the worker
preempts at its first look (``tests/worker/test_preemption_look.py`` covers the wait that default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo4o.jobs import MAX_NUM_IMAGES, MAX_STEPS
from tests.support.worker_proc import WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import (
    QUICK,
    cancel,
    job_row,
    private_redis_url,
    submit,
    worker_env,
)

#: A lower-priority job long enough to be seen mid-run and paused: seconds of tiny-model sampling.
LONG = {"height": 256, "width": 256, "num_steps": 100, "num_images": 2}
#: A job that outlasts anything a test does while it runs (tens of seconds here); the test cancels it.
UNTIL_CANCELLED = {"height": 512, "width": 512, "num_steps": MAX_STEPS, "num_images": MAX_NUM_IMAGES}


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, str]:
    url = private_redis_url(offset=12)
    return worker_env(tmp_path_factory.mktemp("preemption-stack"), tiny_model, ECHO4O_BROKER_URL=url,
                      ECHO4O_BATCH_MAX_SIZE="4", ECHO4O_BATCH_WAIT_MS="50", ECHO4O_PREEMPT_AFTER_S="0",
                      ECHO4O_PREVIEW_EVERY="0")


def _pixels(data_dir: Path, job) -> list[np.ndarray]:  # noqa: ANN001
    out = []
    for rel in job.result["images"]:
        with Image.open(data_dir / rel) as img:
            out.append(np.asarray(img.convert("RGB")))
    return out


def _succeeded(job_id: str, worker: WorkerProcess):  # noqa: ANN202
    job = wait_for_job(job_id, worker=worker)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    return job


def test_a_higher_priority_job_runs_inside_a_running_one(stack, module_worker: WorkerProcess) -> None:
    alone = _succeeded(submit(prompt="urgent", seed=3, priority=9, **QUICK), module_worker)

    background = submit(prompt="background", seed=1, priority=1, **UNTIL_CANCELLED)
    wait_for_progress(background, worker=module_worker)
    # of another shape than the urgent job, which would take it as a batch companion
    same_priority = submit(prompt="same priority", seed=2, priority=1, height=48, width=32, num_steps=3)
    urgent = submit(prompt="urgent", seed=3, priority=9, **QUICK)

    job = _succeeded(urgent, module_worker)  # the background job never ends by itself: it was preempted
    row = job_row(background)
    assert row.status == "running" and job.worker == row.worker == module_worker.worker_id
    assert job.attempts == 1 and "paused" not in job.result
    assert job.started_at > row.started_at
    assert job_row(same_priority).status == "queued"  # no pause for a job of the running one's own priority
    assert np.array_equal(_pixels(Path(stack["ECHO4O_DATA_DIR"]), job),
                          _pixels(Path(stack["ECHO4O_DATA_DIR"]), alone))

    step = row.progress_step
    resumed = wait_for_progress(background, min_step=step + 1, worker=module_worker)  # it goes on sampling
    assert resumed.progress_stage == "sampling" and not resumed.progress_detail  # the pause's detail is gone
    cancel(background)
    ended = wait_for_job(background, worker=module_worker)
    assert ended.status == "cancelled"
    assert _succeeded(same_priority, module_worker).started_at >= ended.finished_at


def test_a_paused_batch_finishes_with_the_images_it_makes_alone(stack, module_worker: WorkerProcess) -> None:
    data_dir = Path(stack["ECHO4O_DATA_DIR"])
    requests = [{"prompt": "a red panda", "seed": 11, "priority": 0, **LONG},
                {"prompt": "a lighthouse", "seed": 12, "priority": 0, "cfg_text_scale": 6.0, **LONG}]
    alone = [_succeeded(submit(**params), module_worker) for params in requests]

    blocker = submit(prompt="blocker", priority=0, **UNTIL_CANCELLED)
    wait_for_job(blocker, statuses=("running",), worker=module_worker)
    ids = [submit(**params) for params in requests]
    assert job_row(blocker).status == "running"  # so both were queued together: one batch when it ends
    cancel(blocker)
    wait_for_progress(ids[0], worker=module_worker)
    urgent = submit(prompt="urgent", seed=5, priority=7, **QUICK)

    job = _succeeded(urgent, module_worker)
    batched = [_succeeded(job_id, module_worker) for job_id in ids]
    for before, after in zip(alone, batched, strict=True):
        assert after.result["batch"]["size"] == 2
        assert job.finished_at < after.finished_at
        assert [p["job_id"] for p in after.result["paused"]] == [urgent]
        assert after.result["paused"][0]["s"] > 0
        assert after.progress_step == after.progress_total  # every step, the pause's included
        diffs = [int(np.abs(x.astype(int) - y.astype(int)).max())
                 for x, y in zip(_pixels(data_dir, before), _pixels(data_dir, after), strict=True)]
        assert max(diffs) <= 1  # a batch decodes several images per VAE call: equal up to one level of rounding
