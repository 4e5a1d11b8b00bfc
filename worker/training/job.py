"""The worker's handler of ``finetune`` jobs (queue ``train``): claim the job, train, publish the version.

One job, top to bottom (:func:`execute_finetune_job`):

1. claim the row as an image job is claimed (``mark_running``; a cancel or a finished row stops here), validate
   the payload (:class:`echo4o.jobs.FinetuneJob`), resolve its base version through the registry
   (:mod:`echo4o.versions`) and check the dataset's layout when the job names one;
2. train with :class:`~worker.training.trainer.Trainer` into the job's run folder
   ``<data_dir>/finetune/<job_id>/`` (a checkpoint every ``save_every`` steps, only the newest kept; TensorBoard
   events); a rerun of the same job (its worker died and the broker or the next worker requeued it) finds the
   checkpoint there and resumes from it, ending at the same step count;
3. after every step, hand ``step/total`` with ``stage="train"`` and ``detail`` (loss, lr, samples_per_s, eta_s,
   skipped_rows and ``losses``, the loss curve as ``[step, loss]`` points, see :class:`LossCurve`) to the
   :class:`~worker.progress.ProgressReporter`; a cancel request stops the run at its next step;
4. copy the finished version (released layout + ``manifest.json``) to ``<weights_dir>/<name>/<version>/``
   (written to a temporary folder, then renamed), register it (source ``finetune``) and store the result:
   ``{"version", "path", "final_loss", "steps", "tensorboard", "skipped_rows", "losses"}``. The run's
   checkpoints are deleted once the row says succeeded; its TensorBoard events stay.

Failures: bad params ``invalid_params``; a base version that is not registered ``model_unavailable``; data
that cannot be used at all (no data file, wrong columns, no usable row, wrong layout) ``invalid_dataset``
with the reader's message; a base whose files cannot be loaded ``model_unavailable``; a run longer than
``job_timeout_s`` ``timeout`` (its checkpoint stays; a cancelled run's is deleted); a version
folder that exists already for another job ``version_exists``; anything else ``training_error``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from echo4o import versions
from echo4o.db import crud, session_scope
from echo4o.db.models import Job
from echo4o.jobs import FinetuneJob, describe_validation_error
from echo4o.logging import get_logger
from echo4o.settings import Settings, get_settings
from worker.outcomes import Claim, claim_job, fail_job, free_device_memory, open_job
from worker.progress import ProgressReporter

log = get_logger(__name__)

#: The run folders of fine-tuning jobs, under the data dir.
RUNS_DIR = "finetune"
#: The run's config file for several training processes (in the run folder; not published).
TRAIN_CONFIG = "train_config.json"
#: Most points of the loss curve kept in a job's progress detail.
MAX_CURVE_POINTS = 256

#: ``layout`` of a job -> the reader's layout name (worker.training.data).
_LAYOUT_NAMES = {"t2i": "text-to-image", "multiref": "multi-reference", "echo4o": "echo4o-image"}


class JobStopped(Exception):
    """Raised from the progress callback to end the run: ``reason`` is ``cancelled`` or ``timeout``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JobFailed(Exception):
    """The job cannot run or go on: ``code`` and ``message`` go into its row."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class LossCurve:
    """The loss curve of a run in at most ``max_points`` ``[step, loss]`` points covering every step so far:
    points are kept every ``stride`` steps, and when the list is full every other point is dropped and the
    stride doubles. The newest step is always the last point."""

    def __init__(self, max_points: int = MAX_CURVE_POINTS):
        self.max_points = max(4, max_points)
        self.stride = 1
        self.points: list[list[float]] = []

    def add(self, step: int, loss: float) -> None:
        if self.points and self.points[-1][0] % self.stride != 0:
            self.points.pop()  # the previous newest point was off the stride; it only stood for "latest"
        self.points.append([step, round(float(loss), 6)])
        if len(self.points) > self.max_points:
            self.stride *= 2
            last = self.points[-1]
            self.points = [p for p in self.points[:-1] if p[0] % self.stride == 0] + [last]


def run_dir(job_id: str, settings: Settings | None = None) -> Path:
    """The job's run folder: checkpoints, TensorBoard events and the finished version before it is published."""
    settings = settings or get_settings()
    return settings.data_dir / RUNS_DIR / job_id


def check_layout(payload: FinetuneJob) -> None:
    """When the job names a layout, every data file must have it: a :class:`JobFailed` (``invalid_dataset``)
    naming the first file that does not. Only file names and parquet schemas are read."""
    from worker.training.data import DataError, detect_layout, list_files

    try:
        files = list_files(payload.dataset)
    except DataError as exc:
        raise JobFailed("invalid_dataset", str(exc)) from None
    if payload.layout == "auto":
        return
    wanted = _LAYOUT_NAMES[payload.layout]
    for f in files:
        if f.is_parquet:
            import pyarrow.parquet as pq

            try:
                with f.open() as handle:
                    found = detect_layout(pq.ParquetFile(handle).schema_arrow.names, f.path)
            except DataError as exc:
                raise JobFailed("invalid_dataset", str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: not a parquet file
                raise JobFailed("invalid_dataset", f"{f.path} is not a readable parquet file ({exc}); replace or "
                                                   "remove it") from None
        else:
            found = "echo4o-image"
        if found != wanted:
            raise JobFailed("invalid_dataset", f"layout: {f.path} is {found} data, but the job asked for "
                                               f"{payload.layout} ({wanted}); set layout to auto or to the data's")


def resolve_base(payload: FinetuneJob, settings: Settings) -> tuple[str, str]:
    """``(ref, what to load)`` of the job's base version: the named one, else the current version (the
    promoted one, or the configured model). A :class:`JobFailed` (``model_unavailable``) when unknown."""
    with session_scope(settings.database_url) as s:
        ref = payload.base_version or versions.current_version(s, settings)
        try:
            return ref, versions.resolve_path(s, settings, ref)
        except versions.UnknownVersion as exc:
            raise JobFailed("model_unavailable", f"base_version: {exc}") from None


def publish_version(run: Path, target: Path, manifest: dict[str, Any], job_id: str) -> None:
    """Copy the finished version in ``run`` (its files and ``adapter/``, not checkpoints or events) to
    ``target`` with ``manifest``: written under a temporary name, then renamed, so ``target`` is complete or
    absent. A ``target`` of another job is a :class:`JobFailed` (``version_exists``); this job's own (a rerun
    after publishing) is replaced."""
    if target.exists():
        owner = _manifest_job(target)
        if owner != job_id:
            raise JobFailed("version_exists", f"output_version: {target} exists already (from "
                                              f"{owner or 'elsewhere'}); choose another output_version")
    tmp = target.with_name(f".{target.name}.tmp-{job_id}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in run.iterdir():
        if item.name in ("checkpoints", "tensorboard", "manifest.json", TRAIN_CONFIG):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(item), str(tmp / item.name))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def prune_checkpoints(out: Path) -> list[Path]:
    """Delete every checkpoint under ``out`` but the newest complete one (resuming needs only that; for the 7B
    model each is tens of GB). Returns the folders deleted."""
    from worker.training.trainer import CHECKPOINTS, latest_checkpoint

    newest = latest_checkpoint(out)
    if newest is None:
        return []
    old = [p for p in (out / CHECKPOINTS).glob("step-*") if p != newest and not p.name.endswith(".tmp")]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def _manifest_job(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("job_id")
    except (OSError, ValueError, AttributeError):
        return None


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# the handler
# ---------------------------------------------------------------------------------------------------


def execute_finetune_job(job_id: str, *, redelivered: bool = False, row: Job | None = None) -> str:
    """The handler of kind ``finetune``: claim, train (resuming from the run's last checkpoint), publish and
    register the version; returns the final status. Callable without Celery."""
    from worker.runtime import get_runtime

    settings = get_settings()
    opened = open_job(job_id, row=row)
    if opened.outcome is not None:
        return opened.outcome
    payload = opened.payload
    assert isinstance(payload, FinetuneJob)
    try:
        base_ref, base_path = resolve_base(payload, settings)
    except JobFailed as exc:
        return fail_job(job_id, exc.code, exc.message)

    runtime = get_runtime()
    claim = claim_job(job_id, runtime)
    if not isinstance(claim, Claim):
        return claim  # finished, cancelled, or running on a live worker
    attempt = claim.attempt
    log.info("finetune job started", extra={"job_id": job_id, "attempt": attempt, "redelivered": redelivered,
                                            "base": base_ref, "dataset": payload.dataset})
    runtime.set_status("busy")
    try:
        return _train(job_id, payload, base_ref, base_path, settings)
    finally:
        runtime.set_status("ready")


def _train(job_id: str, payload: FinetuneJob, base_ref: str, base_path: str, settings: Settings) -> str:
    from worker.engine.loading import CheckpointError
    from worker.training.data import DataError
    from worker.training.trainer import TrainConfig, TrainingError

    db = settings.database_url
    run = run_dir(job_id, settings)
    name, version = payload.output_ref(job_id, base_ref)
    target = settings.weights_dir / name / version
    deadline = time.monotonic() + settings.job_timeout_s
    curve = LossCurve()
    try:
        if target.exists() and _manifest_job(target) != job_id:
            raise JobFailed("version_exists", f"output_version: {target} exists already; choose another "
                                              "output_version")
        check_layout(payload)
        try:
            config = TrainConfig(base_model=base_path, data=payload.dataset, output_dir=str(run),
                                 device=settings.device, **payload.to_train_kwargs())
        except ValidationError as exc:
            raise JobFailed("invalid_params", describe_validation_error(exc)) from None
        if settings.train_processes > 1 and config.mode == "full":
            config = config.model_copy(update={"sharding": "fsdp"})
        with ProgressReporter(db, job_id) as reporter:
            reporter.report(0, config.total_steps, stage="loading", detail={"base": base_ref})
            if settings.train_processes > 1:
                manifest = _train_processes(config, settings.train_processes, reporter, curve, deadline)
            else:
                manifest = _train_here(config, reporter, curve, deadline, job_id)
        if reporter.cancelled.is_set():  # the cancel arrived with the last step's write
            raise JobStopped("cancelled")
    except JobStopped as stop:
        if stop.reason == "timeout":
            return fail_job(job_id, "timeout", f"the run went past job_timeout_s={settings.job_timeout_s} s: raise "
                                            "ECHO4O_JOB_TIMEOUT_S (and the broker visibility timeout) for long "
                                            f"runs. Its checkpoint stays in {run}; `echo4o finetune --out {run}` "
                                            "with the same settings resumes it")
        # a cancelled job never runs again (a rerun sees cancel_requested at its claim): its checkpoint is waste
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        with session_scope(db) as s:
            crud.mark_cancelled(session=s, job_id=job_id)
        log.info("finetune job cancelled", extra={"job_id": job_id, "step": curve.points[-1][0] if curve.points
                                                   else 0})
        return "cancelled"
    except JobFailed as exc:
        return fail_job(job_id, exc.code, exc.message)
    except DataError as exc:
        return fail_job(job_id, "invalid_dataset", str(exc))
    except TrainingError as exc:
        return fail_job(job_id, "training_error", str(exc))
    except CheckpointError as exc:
        return fail_job(job_id, "model_unavailable",
                        f"base_version {base_ref!r} cannot be loaded from {base_path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one job's crash must not take the worker down
        log.exception("training error", extra={"job_id": job_id})
        return fail_job(job_id, "training_error", f"{type(exc).__name__}: {exc}")
    finally:
        free_device_memory()  # the trainer (model, optimizer, data) went with _train_here's frame

    ref = versions.make_ref(name, version)
    full_manifest = {
        "name": name, "version": version, "source": f"finetune:{job_id}", "parent": base_ref, "job_id": job_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest,
    }
    try:
        publish_version(run, target, full_manifest, job_id)
        with session_scope(db) as s:
            versions.register_version(s, name=name, version=version, path=target, manifest=full_manifest,
                                      source="finetune")
    except JobFailed as exc:
        return fail_job(job_id, exc.code, exc.message)
    except versions.VersionConflict as exc:
        return fail_job(job_id, "version_exists", f"output_version: {exc}")
    except OSError as exc:
        log.exception("could not publish the version", extra={"job_id": job_id})
        return fail_job(job_id, "storage_error", f"could not write the version to {target}: {exc}")
    result = {
        "version": ref, "path": str(target), "final_loss": manifest.get("final_loss"), "steps": manifest["steps"],
        "tensorboard": str(run / "tensorboard"), "skipped_rows": manifest["data"].get("skipped", 0),
        "losses": curve.points,
    }
    with session_scope(db) as s:
        stored = crud.mark_succeeded(session=s, job_id=job_id, result=result)
    # only now: a worker that dies before the row says succeeded reruns the job from its last checkpoint (the
    # final step's), which publishes the same version again instead of training from scratch
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    if not stored:
        log.info("finetune job finished after a cancel; kept cancelled", extra={"job_id": job_id})
        return "cancelled"
    log.info("finetune job succeeded", extra={"job_id": job_id, "version": ref, "steps": manifest["steps"]})
    return "succeeded"


def _train_here(config: Any, reporter: ProgressReporter, curve: LossCurve, deadline: float, job_id: str) -> dict:
    """One process: the trainer in the worker's own process."""
    from worker.training.trainer import Trainer

    trainer = Trainer(config)
    try:
        trainer.setup()  # loads the base, opens the data, resumes from the run's newest checkpoint
        for step, loss in enumerate(trainer.history, start=1):
            curve.add(step, loss)
        if trainer.step:
            log.info("finetune job resumed", extra={"job_id": job_id, "step": trainer.step})
        trainer.callback = _on_progress(trainer, reporter, curve, deadline)
        return trainer.train()
    finally:
        trainer = None


#: Lines of a multi-process run's output kept for the error message of a failed run.
TAIL_LINES = 40


def _train_processes(config: Any, processes: int, reporter: ProgressReporter, curve: LossCurve,
                     deadline: float) -> dict:
    """Several processes: write the run's config to ``<run>/train_config.json`` and run ``python -m
    torch.distributed.run --standalone --nproc_per_node N -m worker.training.distributed --progress CONFIG`` as
    a subprocess in a process group of its own. Rank 0's progress lines are reported as the in-process run's
    (same stage and detail keys); a cancel request or the deadline terminates the process group; a non-zero
    exit is a :class:`JobFailed` (``training_error``) with each rank's error and the last lines of the output.
    A rerun resumes from the run folder's newest checkpoint as the in-process run does (rank 0 prints the
    restored loss history)."""
    import collections
    import signal
    import subprocess
    import sys

    from worker.training.distributed import PROGRESS_PREFIX

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / TRAIN_CONFIG
    cfg_file.write_text(config.model_dump_json(indent=2), encoding="utf-8")
    (out / "manifest.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "worker.training.distributed", "--progress", str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[str] = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True,
                            preexec_fn=_die_with_parent)
    log.info("training processes started", extra={"pid": proc.pid, "processes": processes})

    def stop_group() -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(PROGRESS_PREFIX):
                tail.append(line.rstrip("\n"))
                continue
            event = json.loads(line[len(PROGRESS_PREFIX):])
            if event["event"] == "error":
                errors.append(f"rank {event['rank']}: {event['error']}")
                continue
            if event["event"] == "setup":
                for step, loss in enumerate(event["history"], start=1):
                    curve.add(step, loss)
                continue
            if event["step"] % config.save_every == 0:  # rank 0 has just written this step's checkpoint
                prune_checkpoints(out)
            curve.add(event["step"], event["loss"])
            reporter.report(event["step"], event["total_steps"], stage="train", detail={
                "loss": event["loss"], "lr": event["lr"], "samples_per_s": round(event["samples_per_s"], 4),
                "eta_s": round(event["eta_s"], 2), "skipped_rows": event["skipped_rows"],
                "losses": list(curve.points),
            })
            if reporter.cancelled.is_set():
                stop_group()
                raise JobStopped("cancelled")
            if time.monotonic() > deadline:
                stop_group()
                raise JobStopped("timeout")
        code = proc.wait()
    except BaseException:
        stop_group()
        raise
    if code != 0:
        lines = "\n".join(tail)
        raise JobFailed("training_error", f"the {processes} training processes exited with status {code}: "
                                          f"{'; '.join(errors) or 'no error reported'}; last lines of their "
                                          f"output:\n{lines}")
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the worker dies, so a SIGKILLed worker's torchrun
    stops its processes instead of training on beside the rerun."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _on_progress(trainer: Any, reporter: ProgressReporter, curve: LossCurve,
                 deadline: float) -> Callable[[Any], None]:
    """The trainer's callback: record the step for the reporter's thread (no database call here), then stop
    the run when a cancel was requested or the deadline has passed."""

    def on_progress(p: Any) -> None:
        if p.step % trainer.config.save_every == 0:  # the trainer has just written this step's checkpoint
            prune_checkpoints(trainer.out)
        curve.add(p.step, p.loss)
        reporter.report(p.step, p.total_steps, stage="train", detail={
            "loss": p.loss, "lr": p.lr, "samples_per_s": round(p.samples_per_s, 4), "eta_s": round(p.eta_s, 2),
            "skipped_rows": trainer.data.counts.skipped, "losses": list(curve.points),
        })
        if reporter.cancelled.is_set():
            raise JobStopped("cancelled")
        if time.monotonic() > deadline:
            raise JobStopped("timeout")

    return on_progress


