"""Celery tasks, kept thin: load the job row, re-validate its payload, call the pipeline, store the images
atomically, report progress. The job row is the source of truth; the task's own return value is only the
final status. No exception escapes a job that failed on its own (bad payload, engine ``ValueError``, a
crash inside the engine): the job is marked failed with the reason and the worker takes the next one.

Torch-free at import time (the engine is imported by :mod:`worker.runtime` when the worker starts).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from celery import shared_task
from pydantic import ValidationError

from echo4o.db import crud, session_scope
from echo4o.jobs import describe_validation_error, parse_job
from echo4o.logging import get_logger
from echo4o.settings import get_settings
from worker.celery_app import TASK_IMAGE, TASK_TRAIN

log = get_logger(__name__)


class JobCancelled(Exception):
    """Raised from the step callback when the job's cancel was requested."""


class JobTimedOut(Exception):
    """Raised from the step callback when the job ran longer than ``job_timeout_s``."""


class ProgressReporter:
    """Writes one running job's progress from a background thread, so that sampling never waits on the
    database.

    The step callback calls :meth:`report`, which only records the newest ``(step, total, preview)`` and
    wakes the thread. The thread writes at once, but at most once per ``min_interval_s`` (the gateway reads
    the rows every 0.1 s; fast steps of a small model need not cost the database more): steps that come
    faster than that, or faster than the database takes writes, are coalesced (the newest step wins; a
    preview is kept until a newer one replaces it). The event stream still shows every step number: it
    reports each step between two rows it reads. Each write also reads ``cancel_requested`` (one statement);
    when set, :attr:`cancelled` is set and the callback stops the job at its next step. While no step comes
    (a long prefill or step), the thread checks for a cancel every ``poll_s`` seconds. :meth:`close` flushes
    the last report and joins the thread; the caller then writes the final state synchronously. A failed
    write is logged and the next one retries: progress is advisory, the job goes on.
    """

    def __init__(
        self, database_url: str, job_id: str, *, min_interval_s: float = 0.05, poll_s: float = 0.5
    ) -> None:
        self.database_url = database_url
        self.job_id = job_id
        self.min_interval_s = min_interval_s
        self.poll_s = poll_s
        self.cancelled = threading.Event()
        self.writes = 0
        self._cond = threading.Condition()
        self._pending: tuple[int, int | None, bytes | None] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"echo4o-progress-{job_id}", daemon=True)
        self._thread.start()

    def report(self, step: int, total: int | None, preview: bytes | None = None) -> None:
        """Record the newest progress; returns at once."""
        with self._cond:
            if preview is None and self._pending is not None:
                preview = self._pending[2]  # not yet written: keep it until a newer one replaces it
            self._pending = (step, total, preview)
            self._cond.notify()

    def close(self) -> None:
        """Write what is still pending, then stop the thread (waits for it)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        last_write = float("-inf")
        while True:
            with self._cond:
                idle_until = time.monotonic() + self.poll_s
                while not self._closing:
                    now = time.monotonic()
                    if self._pending is not None:
                        delay = last_write + self.min_interval_s - now
                    else:
                        delay = idle_until - now
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                pending, self._pending = self._pending, None
                closing = self._closing
            if pending is not None:
                self._write(pending)
                last_write = time.monotonic()
            elif closing:
                return
            else:
                self._poll_cancel()

    def _write(self, pending: tuple[int, int | None, bytes | None]) -> None:
        step, total, preview = pending
        try:
            with session_scope(self.database_url) as s:
                cancel = crud.update_progress(session=s, job_id=self.job_id, step=step, total=total, preview=preview)
            self.writes += 1
        except Exception as exc:  # noqa: BLE001 - a missed progress write is retried by the next one
            log.warning("progress write failed", extra={"job_id": self.job_id, "step": step, "error": str(exc)})
            return
        if cancel:
            self.cancelled.set()

    def _poll_cancel(self) -> None:
        try:
            with session_scope(self.database_url) as s:
                job = crud.get_job(session=s, job_id=self.job_id)
                cancel = job is not None and job.cancel_requested
        except Exception as exc:  # noqa: BLE001 - the next poll retries
            log.warning("cancel check failed", extra={"job_id": self.job_id, "error": str(exc)})
            return
        if cancel:
            self.cancelled.set()


@shared_task(name=TASK_IMAGE, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_image_job(self: Any, job_id: str) -> str:
    """Run one generate or multiref job; returns its final status."""
    return execute_image_job(job_id, redelivered=bool((self.request.delivery_info or {}).get("redelivered")))


@shared_task(name=TASK_TRAIN, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_train_job(self: Any, job_id: str) -> str:
    """Fine-tuning jobs arrive with a later version; until then they fail with a clear reason."""
    settings = get_settings()
    with session_scope(settings.database_url) as s:
        crud.mark_failed(
            session=s,
            job_id=job_id,
            code="not_supported",
            message="fine-tuning jobs are not supported by this worker version; upgrade the workers on queue train",
        )
    return "failed"


def execute_image_job(job_id: str, *, redelivered: bool = False) -> str:
    """The body of :func:`run_image_job`, callable without Celery (benchmarks, tests)."""
    from worker.runtime import get_runtime

    settings = get_settings()
    db = settings.database_url
    t_received = time.perf_counter()
    with session_scope(db) as s:
        job = crud.get_job(session=s, job_id=job_id)
        if job is None:
            log.error("job not found; message dropped", extra={"job_id": job_id})
            return "missing"
        if job.is_terminal:
            log.info("job already finished; duplicate delivery skipped", extra={"job_id": job_id, "status": job.status})
            return job.status
        if job.cancel_requested:
            crud.mark_cancelled(session=s, job_id=job_id)
            log.info("job cancelled before it started", extra={"job_id": job_id})
            return "cancelled"
        try:
            payload = parse_job(job.kind, job.params)
        except ValidationError as exc:
            crud.mark_failed(session=s, job_id=job_id, code="invalid_params", message=describe_validation_error(exc))
            log.warning("job params invalid", extra={"job_id": job_id, "error": describe_validation_error(exc)})
            return "failed"
        except ValueError as exc:
            crud.mark_failed(session=s, job_id=job_id, code="invalid_params", message=str(exc))
            return "failed"

        runtime = get_runtime()
        if payload.model_version and payload.model_version != runtime.model_version:
            crud.mark_failed(
                session=s,
                job_id=job_id,
                code="model_unavailable",
                message=f"model_version {payload.model_version!r} is not served by this worker "
                f"(it serves {runtime.model_version!r})",
            )
            return "failed"

        if not crud.mark_running(session=s, job_id=job_id, worker=runtime.worker_id, gpu=runtime.gpu_name):
            # cancelled or finished between our read and the claim
            row = crud.get_job(session=s, job_id=job_id)
            if row is not None and row.status == "queued" and row.cancel_requested:
                crud.mark_cancelled(session=s, job_id=job_id)
            return row.status if row is not None else "missing"
        job = crud.get_job(session=s, job_id=job_id)
        assert job is not None
        queue_wait_s = max(0.0, (job.started_at - job.created_at).total_seconds())
        attempt = job.attempts

    log.info(
        "job started",
        extra={"job_id": job_id, "kind": job.kind, "attempt": attempt, "redelivered": redelivered,
               "queue_wait_s": round(queue_wait_s, 3)},
    )
    runtime.set_status("busy")
    try:
        return _run(job_id, job.kind, payload, runtime, queue_wait_s, t_received)
    finally:
        runtime.set_status("ready")


def _run(job_id: str, kind: str, payload: Any, runtime: Any, queue_wait_s: float, t_received: float) -> str:
    settings = get_settings()
    db = settings.database_url
    deadline = time.monotonic() + settings.job_timeout_s

    last = {"step": 0, "total": None}
    reporter: ProgressReporter | None = None

    def on_step(step: int, total: int, preview: Any = None) -> None:
        # runs between two sampling steps: no database call here (the reporter thread writes)
        last.update(step=step, total=total)
        png = None
        if preview is not None:
            from worker.runtime import preview_png

            png = preview_png(preview)
        assert reporter is not None
        reporter.report(step, total, png)
        if reporter.cancelled.is_set():
            raise JobCancelled(job_id)
        if time.monotonic() > deadline:
            raise JobTimedOut(job_id)

    try:
        kwargs = payload.to_pipeline_kwargs(settings.data_dir) if kind == "multiref" else payload.to_pipeline_kwargs()
        with session_scope(db) as s:
            if crud.update_progress(session=s, job_id=job_id, step=0, total=None, stage="sampling"):
                raise JobCancelled(job_id)
        reporter = ProgressReporter(db, job_id)
        t0 = time.perf_counter()
        try:
            out = runtime.pipeline(**kwargs, callback=on_step, preview_every=settings.preview_every)
        finally:
            reporter.close()  # the last step is in the row before the job moves on
        sampling_s = time.perf_counter() - t0
        if reporter.cancelled.is_set():  # the cancel arrived with the last step's write
            raise JobCancelled(job_id)
    except JobCancelled:
        with session_scope(db) as s:
            crud.mark_cancelled(session=s, job_id=job_id)
        log.info("job cancelled while running", extra={"job_id": job_id, "step": last["step"]})
        return "cancelled"
    except JobTimedOut:
        return _fail(job_id, "timeout", f"the job ran longer than job_timeout_s={settings.job_timeout_s} s")
    except ValueError as exc:
        return _fail(job_id, "invalid_params", str(exc))
    except Exception as exc:  # noqa: BLE001 - one job's crash must not take the worker down
        log.exception("engine error", extra={"job_id": job_id})
        _free_device_memory()
        return _fail(job_id, "engine_error", f"{type(exc).__name__}: {exc}")

    try:
        with session_scope(db) as s:
            crud.update_progress(session=s, job_id=job_id, step=last["step"], total=last["total"], stage="encoding")
        t1 = time.perf_counter()
        params = dict(out.params)
        params.setdefault("model_version", runtime.model_version)
        paths = write_images(job_id, out.images, params, settings.data_dir)
        encoding_s = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - disk full, permissions: fail the job, keep serving
        log.exception("could not store images", extra={"job_id": job_id})
        return _fail(job_id, "storage_error", f"could not write the images under {settings.data_dir}: {exc}")

    timings = {
        "queue_wait_s": round(queue_wait_s, 4),
        "sampling_s": round(sampling_s, 4),
        "encoding_s": round(encoding_s, 4),
        "total_s": round(time.perf_counter() - t_received, 4),
    }
    result = {"images": paths, "seed": int(params.get("seed", payload.seed)), "timings": timings}
    with session_scope(db) as s:
        stored = crud.mark_succeeded(session=s, job_id=job_id, result=result)
    if not stored:  # cancelled at the very end: the images stay, the row says cancelled
        log.info("job finished after a cancel; kept cancelled", extra={"job_id": job_id})
        with session_scope(db) as s:
            crud.mark_cancelled(session=s, job_id=job_id)
        return "cancelled"
    log.info("job succeeded", extra={"job_id": job_id, **timings, "images": len(paths)})
    return "succeeded"


def _fail(job_id: str, code: str, message: str) -> str:
    with session_scope(get_settings().database_url) as s:
        crud.mark_failed(session=s, job_id=job_id, code=code, message=message)
    log.warning("job failed", extra={"job_id": job_id, "code": code, "error": message})
    return "failed"


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def write_images(job_id: str, images: list[Any], params: dict[str, Any], data_dir: Path) -> list[str]:
    """Write ``<data_dir>/results/<job_id>/<n>.png`` atomically (temp file + rename) with the generation
    parameters in the PNG text chunks; returns the paths relative to ``data_dir``. A rerun of the same job
    overwrites the same files, so a redelivered job is harmless."""
    from echo4o.pnginfo import write_png

    rel: list[str] = []
    for n, image in enumerate(images):
        write_png(image, data_dir / "results" / job_id / f"{n}.png", {**params, "image_index": n})
        rel.append(f"results/{job_id}/{n}.png")
    return rel
