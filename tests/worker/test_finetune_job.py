"""Fine-tuning jobs on a real `echo4o worker --queues train` subprocess (SQLite records), the tiny
model and tiny datasets written by the training library: a run publishes and registers its version with
the loss in every progress write; a SIGKILLed worker's run resumes from its last checkpoint in the next
worker and ends at the same step count (with either broker); bad datasets fail as invalid_dataset naming the
problem."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echo4o import versions
from echo4o.db import session_scope
from echo4o.settings import get_settings
from tests.support.worker_proc import POLL_S, WAIT_S, WorkerProcess, wait_for_job, wait_for_progress
from tests.worker.jobs_support import private_redis_url, submit, use_env, worker_env
from worker.training.data import TEXT_TO_IMAGE, write_test_dataset
from worker.training.job import LossCurve

#: A run on the tiny model at 32 px: one sample per step, no warm-up, a large lr so the loss moves.
SMALL_RUN = {"mode": "lora", "lr": 2e-3, "warmup_steps": 0, "expected_tokens": 1, "max_tokens": 400,
             "vae_min_size": 32, "vae_max_size": 32}


def test_loss_curve_keeps_every_step_until_full_then_halves_evenly() -> None:
    curve = LossCurve(max_points=8)
    for step in range(1, 9):
        curve.add(step, 1.0 / step)
    assert [p[0] for p in curve.points] == list(range(1, 9))
    curve.add(9, 0.1)  # 9 points > 8: keep the even steps and the newest
    assert [p[0] for p in curve.points] == [2, 4, 6, 8, 9]
    curve.add(10, 0.1)  # 9 was only "the newest": replaced
    assert [p[0] for p in curve.points] == [2, 4, 6, 8, 10]


def _bad_columns(folder: Path) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"picture": [b"x"], "text": ["a cat"]}), folder / "wrong.parquet")
    return folder


def test_a_run_publishes_its_version_and_bad_datasets_fail_clearly(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model, ECHO4O_WEIGHTS_DIR=str(tmp_path / "weights")))
    good = write_test_dataset(data_dir / "datasets" / "good", TEXT_TO_IMAGE, num_rows=2, bad_rows=1)
    undecodable = write_test_dataset(data_dir / "datasets" / "undecodable", TEXT_TO_IMAGE, num_rows=0, bad_rows=2)
    empty = data_dir / "datasets" / "empty"
    empty.mkdir(parents=True)
    columns = _bad_columns(data_dir / "datasets" / "columns")

    with WorkerProcess(queues="train", log_path=tmp_path / "worker.log") as worker:
        job_id = submit("finetune", dataset=str(good), steps=6, save_every=3, output_version="v-test", **SMALL_RUN)
        job = wait_for_job(job_id, worker=worker)
        assert job.status == "succeeded", (job.error_code, job.error_message, worker.tail())
        settings = get_settings()
        ref = f"{tiny_model.name}/v-test"
        assert job.result["version"] == ref and job.result["steps"] == 6
        assert job.result["skipped_rows"] >= 1  # the undecodable row, counted
        assert [p[0] for p in job.result["losses"]] == list(range(1, 7))
        detail = job.progress_detail
        assert job.progress_stage == "done" and job.progress_step == 6 and job.progress_total == 6
        assert detail["loss"] == job.result["final_loss"] and detail["losses"][-1][0] == 6
        assert {"lr", "samples_per_s", "eta_s", "skipped_rows"} <= set(detail)
        folder = settings.weights_dir / tiny_model.name / "v-test"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["source"] == f"finetune:{job_id}" and manifest["parent"] == tiny_model.name
        assert manifest["steps"] == 6 and (folder / "ema.safetensors").is_file()
        assert list(Path(job.result["tensorboard"]).glob("events.out.tfevents.*"))
        # the checkpoints go once the row says succeeded (a crash before that resumes from them): just after it
        checkpoints = data_dir / "finetune" / job_id / "checkpoints"
        deadline = time.monotonic() + WAIT_S
        while checkpoints.exists():
            assert time.monotonic() < deadline, f"{checkpoints} still there {WAIT_S} s after the job succeeded"
            time.sleep(POLL_S)
        with session_scope() as s:
            row = versions.get_version(s, ref)
            assert row is not None and row.source == "finetune" and row.path == str(folder)

        expected = {
            str(undecodable): "no usable row",
            str(empty): "no data files",
            str(columns): "has columns ['picture', 'text']",
        }
        ids = {submit("finetune", dataset=path, steps=2, **SMALL_RUN): text for path, text in expected.items()}
        ids[submit("finetune", dataset=str(good), layout="multiref", steps=2, **SMALL_RUN)] = "is text-to-image data"
        for bad_id, text in ids.items():
            job = wait_for_job(bad_id, worker=worker)
            assert (job.status, job.error_code) == ("failed", "invalid_dataset"), (job.error_message, worker.tail())
            assert text in job.error_message


#: Redis hands a dead worker's job to another after the visibility timeout (just above the job timeout here). The
#: resumed run must end within the job timeout even on a loaded 2-core machine: 30 s was too tight in CI.
REDIS_JOB_TIMEOUT_S = 120


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_a_killed_training_worker_resumes_from_its_last_checkpoint(
    broker: str, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    extra = {"ECHO4O_WEIGHTS_DIR": str(tmp_path / "weights")}
    if broker == "redis":  # redelivered by the broker; embedded: requeued by the next worker from the job rows
        extra |= {"ECHO4O_BROKER_URL": private_redis_url(offset=12), "ECHO4O_JOB_TIMEOUT_S": str(REDIS_JOB_TIMEOUT_S),
                  "ECHO4O_BROKER_VISIBILITY_TIMEOUT_S": str(REDIS_JOB_TIMEOUT_S + 1)}
    use_env(monkeypatch, worker_env(data_dir, tiny_model, **extra))
    data = write_test_dataset(data_dir / "datasets" / "t2i", TEXT_TO_IMAGE, num_rows=2)
    steps = 40
    with WorkerProcess(queues="train", log_path=tmp_path / "first.log") as first:
        job_id = submit("finetune", dataset=str(data), steps=steps, save_every=2, **SMALL_RUN)
        job = wait_for_progress(job_id, min_step=5, worker=first)  # past a checkpoint, mid-run
        first.kill()
    # the kill may land while a checkpoint is being written: its half-written ``.tmp`` folder is never resumed from
    names = sorted(p.name for p in (data_dir / "finetune" / job_id / "checkpoints").glob("step-*"))
    checkpoints = [n for n in names if not n.endswith(".tmp")]
    assert checkpoints, names
    resumed_from = int(checkpoints[-1].removeprefix("step-"))
    assert 0 < resumed_from < steps

    with WorkerProcess(queues="train", log_path=tmp_path / "second.log") as second:
        job = wait_for_job(job_id, worker=second)
        assert job.status == "succeeded", (job.error_code, job.error_message, second.tail())
    assert job.attempts == 2 and job.worker == second.worker_id
    assert job.result["steps"] == steps
    assert "finetune job resumed" in second.logs()
    # on both brokers the next worker's heartbeat sweep finds the first dead and requeues the job (before Redis's
    # visibility timeout would redeliver it; that late delivery is then dropped)
    assert "requeued a job whose worker is gone" in second.logs()
    # the curve spans both workers' steps: the losses before the kill came back with the checkpoint
    assert job.result["losses"][0][0] == 1 and job.result["losses"][-1][0] == steps


def test_a_run_past_the_job_timeout_fails_and_keeps_its_checkpoints(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model, ECHO4O_JOB_TIMEOUT_S="10"))
    data = write_test_dataset(data_dir / "datasets" / "t2i", TEXT_TO_IMAGE, num_rows=2)
    with WorkerProcess(queues="train", log_path=tmp_path / "worker.log") as worker:
        job_id = submit("finetune", dataset=str(data), steps=1_000_000, save_every=1, **SMALL_RUN)
        job = wait_for_job(job_id, worker=worker)
    assert (job.status, job.error_code) == ("failed", "timeout"), (job.error_message, worker.tail())
    assert "ECHO4O_JOB_TIMEOUT_S" in job.error_message
    kept = [p.name for p in (data_dir / "finetune" / job_id / "checkpoints").glob("step-*")]
    assert len(kept) == 1 and not kept[0].endswith(".tmp"), kept  # only the newest is kept


def test_a_run_over_two_training_processes_publishes_the_weights_of_one_process(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ECHO4O_TRAIN_PROCESSES=2: the worker runs torchrun (two gloo CPU processes, full mode sharded with FSDP)
    as its subprocess; rank 0's progress reaches the row with the loss, and the published weights equal those
    of the same job on a worker that trains in its own process."""
    import torch
    from safetensors.torch import load_file

    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model, ECHO4O_WEIGHTS_DIR=str(tmp_path / "weights")))
    data = write_test_dataset(data_dir / "datasets" / "good", TEXT_TO_IMAGE, num_rows=2)
    run = {**SMALL_RUN, "mode": "full", "expected_tokens": 400, "steps": 2, "save_every": 1}
    weights = {}
    for processes in (2, 1):
        with WorkerProcess(queues="train", env={"ECHO4O_TRAIN_PROCESSES": str(processes)},
                           log_path=tmp_path / f"worker{processes}.log") as worker:
            job_id = submit("finetune", dataset=str(data), output_version=f"v-{processes}", **run)
            job = wait_for_job(job_id, worker=worker)
        assert job.status == "succeeded", (job.error_code, job.error_message, worker.tail())
        assert job.result["steps"] == 2 and [p[0] for p in job.result["losses"]] == [1, 2]
        assert job.progress_detail["loss"] == job.result["final_loss"]
        assert {"lr", "samples_per_s", "eta_s", "skipped_rows", "losses"} <= set(job.progress_detail)
        folder = get_settings().weights_dir / tiny_model.name / f"v-{processes}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["world_size"] == processes
        assert manifest["sharding"] == ("fsdp" if processes == 2 else "none")
        # the checkpoints go once the row says succeeded (a crash before that resumes from them): just after it
        checkpoints = data_dir / "finetune" / job_id / "checkpoints"
        deadline = time.monotonic() + WAIT_S
        while checkpoints.exists():
            assert time.monotonic() < deadline, f"{checkpoints} still there {WAIT_S} s after the job succeeded"
            time.sleep(POLL_S)
        assert not (folder / "train_config.json").exists()  # the run's own file, not the version's
        weights[processes] = load_file(folder / "ema.safetensors")
    # the tolerance rule of tests/training: the ViT key bias's gradient is exactly zero, so AdamW turns rounding
    # noise into full-size steps there; everything else agrees to float32 summation order
    for k in (k for k in weights[1] if not (k.startswith("vit_model.") and k.endswith("k_proj.bias"))):
        assert torch.allclose(weights[1][k], weights[2][k], atol=1e-5), k


class _Reporter:
    """What _train_processes uses of a ProgressReporter: report() and the cancelled flag."""

    def __init__(self, cancelled: bool):
        import threading

        self.cancelled = threading.Event()
        if cancelled:
            self.cancelled.set()
        self.reports: list[tuple[int, int, str, dict]] = []

    def report(self, step: int, total: int, *, stage: str, detail: dict) -> None:
        self.reports.append((step, total, stage, detail))


def test_training_processes_stop_on_cancel_and_a_failed_run_reports_its_last_lines(
    tmp_path: Path, tiny_model: Path
) -> None:
    import time

    from worker.training.job import JobFailed, JobStopped, _train_processes
    from worker.training.trainer import TrainConfig

    data = write_test_dataset(tmp_path / "datasets" / "good", TEXT_TO_IMAGE, num_rows=2)
    config = TrainConfig(base_model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "run"), mode="full",
                         sharding="fsdp", total_steps=1000, warmup_steps=0, expected_tokens=1, max_tokens=400,
                         max_tokens_per_sample=400, vit_min_size=28, vit_max_size=28,
                         vae_min_size=32, vae_max_size=32, save_every=1000, device="cpu")
    reporter = _Reporter(cancelled=True)
    with pytest.raises(JobStopped, match="cancelled"):
        _train_processes(config, 2, reporter, LossCurve(), time.monotonic() + 600)
    assert [r[0] for r in reporter.reports] == [1] and reporter.reports[0][2] == "train"
    assert "loss" in reporter.reports[0][3]  # stopped after its first step, the process group terminated
    assert not (tmp_path / "run" / "manifest.json").exists()

    broken = config.model_copy(update={"base_model": str(tmp_path / "no-such-model")})
    message = r"exited with status [1-9]: rank [01]: \w+: .*no-such-model.*; last lines"
    with pytest.raises(JobFailed, match=message) as failed:
        _train_processes(broken, 2, _Reporter(cancelled=False), LossCurve(), time.monotonic() + 600)
    assert failed.value.code == "training_error"


def _processes_with(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_killed_worker_stops_its_training_processes_and_the_next_resumes_them(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import select

    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model, ECHO4O_WEIGHTS_DIR=str(tmp_path / "weights"),
                                    ECHO4O_TRAIN_PROCESSES="2"))
    data = write_test_dataset(data_dir / "datasets" / "t2i", TEXT_TO_IMAGE, num_rows=2)
    steps = 16
    with WorkerProcess(queues="train", log_path=tmp_path / "first.log") as first:
        job_id = submit("finetune", dataset=str(data), steps=steps, save_every=2, **SMALL_RUN)
        wait_for_progress(job_id, min_step=3, worker=first)  # past a checkpoint, mid-run
        config_file = str(data_dir / "finetune" / job_id / "train_config.json")
        training = [os.pidfd_open(pid) for pid in _processes_with(config_file)]
        assert len(training) == 3  # torchrun and its two processes
        first.kill()
    for fd in training:  # the parent-death signal ends torchrun, which ends its processes: each pidfd turns readable
        assert select.select([fd], [], [], 60)[0] == [fd]
        os.close(fd)
    assert not _processes_with(config_file)
    # a checkpoint half-written when the kill landed (.tmp) is never resumed from: only finished ones count
    checkpoints = sorted(p.name for p in (data_dir / "finetune" / job_id / "checkpoints").glob("step-*")
                         if not p.name.endswith(".tmp"))
    assert checkpoints and 0 < int(checkpoints[-1].removeprefix("step-")) < steps

    with WorkerProcess(queues="train", log_path=tmp_path / "second.log") as second:
        job = wait_for_job(job_id, worker=second)
        assert job.status == "succeeded", (job.error_code, job.error_message, second.tail())
    assert job.attempts == 2 and job.result["steps"] == steps
    assert job.result["losses"][0][0] == 1 and job.result["losses"][-1][0] == steps  # curve restored
