"""Cross-request batching (worker/batching.py) through real Redis into real `echo4o worker` subprocesses running
the tiny model: compatible jobs that queue together run as one batch, each with its own result, equal to the
same job run alone; a job cancelled mid-batch ends cancelled while the others succeed; an off-shape job is not
part of a batch; two workers never run the same job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo4o.pnginfo import params_from_png
from tests.support.worker_proc import WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import (
    KILLABLE,
    UNTIL_CANCELLED,
    cancel,
    job_row,
    private_redis_url,
    start_ready_worker,
    submit,
    worker_env,
)

SHAPE = {"height": 32, "width": 48, "num_steps": 4}


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, str]:
    url = private_redis_url(offset=11)
    return worker_env(tmp_path_factory.mktemp("batching-stack"), tiny_model, ECHO4O_BROKER_URL=url,
                      ECHO4O_BATCH_MAX_SIZE="4", ECHO4O_BATCH_WAIT_MS="50")


def _requests(data_dir: Path) -> list[tuple[str, dict]]:
    """Four compatible requests (one shape), each with its own prompt, seed and guidance; one with a reference."""
    (data_dir / "uploads" / "batch").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), (200, 40, 40)).save(data_dir / "uploads" / "batch" / "0.png")
    return [
        ("generate", {"prompt": "a red panda on a bed", "seed": 1, **SHAPE}),
        ("generate", {"prompt": "a lighthouse at dusk", "seed": 123, "cfg_text_scale": 6.0,
                      "cfg_renorm_type": "channel", "num_images": 2, **SHAPE}),
        ("multiref", {"prompt": "make it blue", "references": ["uploads/batch/0.png"], "seed": 7,
                      "cfg_text_scale": 3.0, "cfg_img_scale": 1.5, **SHAPE}),
        ("generate", {"prompt": "a green teapot", "seed": 99, "cfg_interval": [0.5, 1.0], **SHAPE}),
    ]


def _images(data_dir: Path, job) -> list[tuple[dict, np.ndarray]]:
    """The PNG parameters and pixels of each image of ``job``."""
    out = []
    for rel in job.result["images"]:
        with Image.open(data_dir / rel) as img:
            out.append((params_from_png(data_dir / rel), np.asarray(img.convert("RGB"))))
    return out


def test_compatible_jobs_run_as_one_batch_equal_to_alone(stack, module_worker: WorkerProcess) -> None:
    data_dir = Path(stack["ECHO4O_DATA_DIR"])
    requests = _requests(data_dir)
    # alone: each submitted while the worker is idle and nothing else waits, so it starts at once, by itself
    alone = []
    for kind, params in requests:
        job = wait_for_job(submit(kind, **params), worker=module_worker)
        assert job.status == "succeeded", (job.error_code, job.error_message)
        assert "batch" not in job.result
        alone.append(job)

    blocker = submit(prompt="blocker", **UNTIL_CANCELLED)
    wait_for_job(blocker, statuses=("running",), worker=module_worker)
    ids = [submit(kind, **params) for kind, params in requests]
    off_shape = submit(prompt="another size", seed=5, height=48, width=48, num_steps=4)
    assert job_row(blocker).status == "running"  # so all of them were queued together
    cancel(blocker)

    batched = [wait_for_job(job_id, worker=module_worker) for job_id in ids]
    for job in batched:
        assert job.status == "succeeded", (job.error_code, job.error_message)
        assert job.attempts == 1 and job.worker == module_worker.worker_id
    batches = {(job.result["batch"]["id"], job.result["batch"]["size"]) for job in batched}
    assert len(batches) == 1 and next(iter(batches))[1] == 4  # one batch of the four
    for one, other in zip(alone, batched, strict=True):
        assert one.result["seed"] == other.result["seed"]
        a, b = _images(data_dir, one), _images(data_dir, other)
        assert [p for p, _ in a] == [p for p, _ in b]  # the same parameters, image by image
        diffs = [int(np.abs(x.astype(int) - y.astype(int)).max()) for (_, x), (_, y) in zip(a, b, strict=True)]
        assert max(diffs) <= 1  # the batch decodes several images per VAE call: equal up to one level of rounding
        assert other.progress_step == other.progress_total == one.progress_total  # its own progress, every step

    job = wait_for_job(off_shape, worker=module_worker)
    assert job.status == "succeeded" and "batch" not in job.result  # it ran alone, not in (or after) a batch
    assert job.attempts == 1


def test_a_job_cancelled_mid_batch_ends_cancelled_and_the_others_succeed(stack, module_worker: WorkerProcess) -> None:
    blocker = submit(prompt="blocker", **UNTIL_CANCELLED)
    wait_for_job(blocker, statuses=("running",), worker=module_worker)
    ids = [submit(prompt=f"long {n}", seed=n, **KILLABLE) for n in range(3)]
    assert job_row(blocker).status == "running"
    cancel(blocker)
    wait_for_progress(ids[1], worker=module_worker)  # mid-sampling, in the batch
    assert job_row(ids[0]).status == "running" and job_row(ids[2]).status == "running"
    cancel(ids[1])

    jobs = [wait_for_job(job_id, worker=module_worker) for job_id in ids]
    assert jobs[1].status == "cancelled" and jobs[1].result is None
    assert 1 <= jobs[1].progress_step < jobs[1].progress_total
    for job in (jobs[0], jobs[2]):
        assert job.status == "succeeded", (job.error_code, job.error_message)
        assert job.result["batch"]["size"] == 3 and len(job.result["images"]) == 1
        assert job.attempts == 1


def test_two_workers_never_run_the_same_job(stack, stack_env: dict[str, str], module_worker: WorkerProcess) -> None:
    second = start_ready_worker(stack_env, "worker2.log")
    try:
        ids = [submit(prompt=f"job {n}", seed=n, **SHAPE) for n in range(8)]
        jobs = [wait_for_job(job_id, worker=module_worker) for job_id in ids]
        for job in jobs:
            assert job.status == "succeeded", (job.error_code, job.error_message)
            assert job.attempts == 1 and len(job.result["images"]) == 1
        members: dict[str, list[str]] = {}
        for job in jobs:
            batch = job.result.get("batch")
            if batch is not None:
                members.setdefault(batch["id"], []).append(job.id)
                assert batch["size"] <= 4
        for batch_id, batch_ids in members.items():  # every member of a batch ran on the same worker
            assert len({job_row(j).worker for j in batch_ids}) == 1, batch_id
    finally:
        second.stop()
