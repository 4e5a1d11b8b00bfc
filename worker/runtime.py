"""One worker process: the model loaded once, warmed up, and a heartbeat row in ``workers``.

Lifecycle of ``echo4o worker``: migrate the records, register as ``loading``, load the pipeline, warm it up,
(embedded broker) recover jobs orphaned by a dead worker, then serve Celery on the solo pool (one job at a
time, in this process, so the model is never copied) and report ``ready``; ``busy`` while a job runs;
``stopped`` at shutdown. A job that names another model version (promoted, or asked for) gets it loaded
between jobs and kept resident while the budget allows (:mod:`worker.models_cache`). A thread refreshes the
heartbeat every ``worker_heartbeat_s`` seconds, also while a job runs.

Dead workers are found fast: at every beat each worker also sweeps (:meth:`WorkerRuntime.sweep`): a worker that
has not beaten for :data:`DEAD_AFTER_BEATS` beats and is not ``stopped`` is marked ``dead`` and its ``running``
jobs are put back to ``queued`` (one conditional UPDATE, so two sweepers never both requeue a job) and sent to
their queue again, on either broker. The broker's own redelivery (Redis, after its visibility timeout) then finds
the job finished or running on a live worker and is dropped (``worker.outcomes.claim_job``).

SIGTERM is a warm shutdown: the job that runs may finish within ``worker_shutdown_grace_s``; past it the job is
put back to ``queued`` and sent again (another worker runs it), the row says ``stopped`` and the process exits.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from typing import Any

import sqlalchemy as sa

from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.db.models import Job
from echo4o.heap import freeze_long_lived, refreeze
from echo4o.logging import get_logger
from echo4o.settings import Settings, get_settings

log = get_logger(__name__)

WARMUP_SIZE = 64
#: A worker whose heartbeat is this many beats old (and that is not ``stopped``) is dead: its jobs are requeued.
DEAD_AFTER_BEATS = 3


class WorkerRuntime:
    """The state of this worker process: its identity, its pipeline and its status row."""

    def __init__(self, *, settings: Settings | None = None, queues: list[str] | None = None) -> None:
        self.settings = settings or get_settings()
        self.queues = list(queues or ["gpu"])
        self.hostname = socket.gethostname()
        self.worker_id = f"{self.hostname}:{os.getpid()}"
        self.model_version = self.settings.model_version
        self.pipeline: Any = None  # the pipeline of the version the last job ran on (see use())
        self.active_version = self.model_version
        self.models: Any = None  # worker.models_cache.ResidentModels, made by load()
        self.device: str | None = None
        self.gpu_name: str | None = None
        self.attention: str | None = None
        self.status = "loading"
        #: The claim (worker.outcomes.Claim) of the job this worker runs, None between jobs.
        self.claim: Any = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # the heartbeat's thread: a status to write now, or stop
        self._shutdown_timer: threading.Timer | None = None
        self._beat: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------
    def register(self) -> None:
        """Create the schema if needed and write this worker's row (status ``loading``)."""
        upgrade_to_head(self.settings.database_url)
        with session_scope(self.settings.database_url) as s:
            crud.upsert_worker(
                session=s,
                worker_id=self.worker_id,
                hostname=self.hostname,
                queues=self.queues,
                status="loading",
                model_version=self.model_version,
                device=self.settings.device,
            )
        self._beat = threading.Thread(target=self._heartbeat_loop, name="echo4o-heartbeat", daemon=True)
        self._beat.start()

    def load(self) -> None:
        """Load the configured model once (``settings.model`` on ``settings.device``)."""
        from worker.engine import Echo4oPipeline

        s = self.settings
        t0 = time.perf_counter()
        log.info("loading model", extra={"model": s.model, "device": s.device, "dtype": s.dtype})
        if s.hf_token and s.hf_token.get_secret_value():
            os.environ.setdefault("HF_TOKEN", s.hf_token.get_secret_value())  # read by huggingface_hub
        self.pipeline = Echo4oPipeline.from_pretrained(s.model, device=s.device, dtype=s.dtype, attention=s.attention,
                                                       memory_mode=s.memory_mode)
        self._make_resident_models()
        self.device = str(self.pipeline.device)
        self.attention = str(getattr(self.pipeline, "attention_backend", "") or "") or None
        self.gpu_name = _device_name(self.device)
        self._write(device=self.device, attention=self.attention)
        log.info(
            "model loaded",
            extra={
                "model_version": self.model_version,
                "device": self.device,
                "gpu": self.gpu_name,
                "attention": self.attention,
                "load_s": round(time.perf_counter() - t0, 3),
            },
        )

    def _make_resident_models(self) -> None:
        from worker.engine import Echo4oPipeline
        from worker.models_cache import ResidentModels, auto_budget

        s = self.settings

        def load(path: str) -> Any:
            return Echo4oPipeline.from_pretrained(path, device=s.device, dtype=s.dtype, attention=s.attention,
                                                  memory_mode=s.memory_mode)

        budget = s.resident_models_bytes or auto_budget(str(self.pipeline.device))
        self.models = ResidentModels(load, max_models=s.resident_models, max_bytes=budget)
        self.models.add(self.model_version, self.pipeline)

    def use(self, ref: str) -> Any:
        """Make version ``ref`` (a registered ``<name>/<version>`` or the configured version) the pipeline jobs
        run on, loading it if it is not resident; returns it. Called between jobs only. Raises
        ``echo4o.versions.UnknownVersion`` for an unregistered ref, and the loader's errors."""
        from echo4o import versions

        with session_scope(self.settings.database_url) as s:
            path = versions.resolve_path(s, self.settings, ref)
        resident = set(self.models.resident)
        self.pipeline = self.models.get(ref, path)
        self.active_version = ref
        if set(self.models.resident) != resident:  # a version loaded (and maybe others dropped): freeze it too
            refreeze("worker")
        return self.pipeline

    def warm_up(self) -> None:
        """One small generation so that the first job does not pay for kernel selection and allocation."""
        t0 = time.perf_counter()
        self.pipeline("warm-up", height=WARMUP_SIZE, width=WARMUP_SIZE, num_steps=2, seed=0)
        log.info("warm-up done", extra={"warmup_s": round(time.perf_counter() - t0, 3)})

    def set_status(self, status: str, *, now: bool = True) -> None:
        """Set this worker's status: written at once, or with ``now=False`` by the heartbeat's thread within
        moments, off the caller's thread (a job's ``busy`` and ``ready``: two statements fewer on its serving
        path). A stopped worker's row stays ``stopped``."""
        # The lock covers the write too: a heartbeat that read the old status cannot write it after this one.
        with self._lock:
            self.status = status
            if self._stop.is_set():
                return
            if now or self._beat is None or not self._beat.is_alive():
                self._write(status=status)
                return
        self._wake.set()

    @property
    def dead_after_s(self) -> float:
        """Seconds without a heartbeat after which a worker is dead (:data:`DEAD_AFTER_BEATS` beats)."""
        return DEAD_AFTER_BEATS * self.settings.worker_heartbeat_s

    @property
    def shutting_down(self) -> bool:
        """SIGTERM arrived: the running job may finish, no other starts (worker/preemption.py asks)."""
        return self._shutdown_timer is not None

    def begin_shutdown(self) -> None:
        """SIGTERM arrived (Celery's warm shutdown: the running job may finish, no new one starts): past
        ``worker_shutdown_grace_s`` the job still running is requeued and the process exits (:meth:`_overdue`)."""
        if self._shutdown_timer is not None:
            return
        grace = self.settings.worker_shutdown_grace_s
        log.info("worker shutting down", extra={"worker": self.worker_id, "grace_s": grace,
                                                "job_id": self.claim.job_id if self.claim else None})
        self._shutdown_timer = threading.Timer(grace, self._overdue)
        self._shutdown_timer.name = "echo4o-shutdown-grace"
        self._shutdown_timer.daemon = True
        self._shutdown_timer.start()

    def _overdue(self) -> None:
        claim = self.claim
        if claim is None or not self.requeue_claim(claim, reason="the worker stops (grace period over)"):
            return  # no job, or it ended meanwhile: the warm shutdown ends by itself
        # the companions of a batch (worker/batching.py) run under this worker too: requeue them with the lead
        self.requeue_jobs(worker=self.worker_id, found="the worker stops (grace period over)")
        self.stop()
        logging.shutdown()
        os._exit(0)  # the job is queued again; the run in the main thread is abandoned (another worker reruns it)

    def requeue_claim(self, claim: Any, *, reason: str) -> bool:
        """Put the job of ``claim`` back to ``queued`` while this attempt holds it, and send it again; False when
        the attempt no longer holds it (it ended, or was taken)."""
        from echo4o.queue import submit

        with session_scope(self.settings.database_url) as s:
            if not crud.requeue_job(session=s, job_id=claim.job_id, **claim.fence()):
                return False
            job = crud.get_job(session=s, job_id=claim.job_id)
            kind, priority = job.kind, job.priority
        try:
            submit(claim.job_id, kind, priority)
        except Exception as exc:  # noqa: BLE001 - Redis still holds the unacknowledged message
            log.error("requeued job could not be sent again", extra={"job_id": claim.job_id, "error": str(exc)})
        log.warning("job requeued", extra={"job_id": claim.job_id, "attempt": claim.attempt, "reason": reason})
        return True

    def stop(self) -> None:
        with self._lock:  # a heartbeat writing now finishes first, and none writes after `stopped`
            if self._stop.is_set():
                return
            self._stop.set()
        self._wake.set()
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
        try:
            self._write(status="stopped")
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("could not mark worker stopped", extra={"error": str(exc)})
        log.info("worker stopped", extra={"worker": self.worker_id})

    # --- heartbeat ---------------------------------------------------------------------------------
    def _write(self, **fields: Any) -> None:
        with session_scope(self.settings.database_url) as s:
            crud.worker_heartbeat(session=s, worker_id=self.worker_id, **fields)

    def _heartbeat_loop(self) -> None:
        """Beat every ``worker_heartbeat_s`` seconds (write the status, then sweep for dead workers); in between,
        write a status set with ``now=False`` as soon as it is set."""
        beat_due = time.monotonic() + self.settings.worker_heartbeat_s
        while True:
            woke = self._wake.wait(max(0.0, beat_due - time.monotonic()))
            self._wake.clear()  # before the write: a status set from here on wakes the loop again
            with self._lock:  # read and write under one lock: never a stale status after set_status's
                if self._stop.is_set():
                    return
                try:
                    self._write(status=self.status)
                except Exception as exc:  # noqa: BLE001 - a missed beat is logged, the next one retries
                    log.warning("heartbeat failed", extra={"worker": self.worker_id, "error": str(exc)})
            if woke and time.monotonic() < beat_due:
                continue  # a status change, not a beat
            beat_due = time.monotonic() + self.settings.worker_heartbeat_s
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - the next beat sweeps again
                log.warning("dead-worker sweep failed", extra={"worker": self.worker_id, "error": str(exc)})

    def sweep(self) -> list[str]:
        """Mark ``dead`` the workers silent for :data:`DEAD_AFTER_BEATS` beats, put the running jobs of dead and
        stopped workers back to ``queued`` and send them again; returns the ids of the jobs requeued. Any worker
        may run it at any time: each job is requeued by one sweeper only (conditional UPDATE)."""

        with session_scope(self.settings.database_url) as s:
            dead = crud.mark_dead_workers(session=s, max_age_s=self.dead_after_s)
        for worker in dead:
            log.warning("worker found dead (no heartbeat)", extra={"dead_worker": worker, "by": self.worker_id,
                                                                    "max_age_s": self.dead_after_s})
        return self.requeue_jobs(found="no heartbeat")

    def requeue_jobs(self, *, worker: str | None = None, found: str) -> list[str]:
        """Put back to ``queued`` and send again the running jobs of every dead or stopped worker (or, with
        ``worker``, of that one); returns their ids. Each job is requeued by one caller only."""
        from echo4o.queue import submit

        with session_scope(self.settings.database_url) as s:
            jobs = crud.requeue_jobs_of_dead_workers(session=s, worker=worker)
        for job_id, kind, priority, holder, attempts in jobs:
            try:
                submit(job_id, kind, priority)
            except Exception as exc:  # noqa: BLE001 - Redis still holds the unacknowledged message
                log.error("requeued job could not be sent again", extra={"job_id": job_id, "error": str(exc)})
            log.warning("requeued a job whose worker is gone",
                        extra={"job_id": job_id, "dead_worker": holder, "attempts": attempts, "found": found})
        return [job[0] for job in jobs]

    # --- recovery ----------------------------------------------------------------------------------
    def recover_orphans(self) -> list[str]:
        """Requeue jobs left ``running`` by a worker that is gone (embedded broker only: Redis redelivers
        them by itself after the visibility timeout). A worker is gone when it is this host's and its
        process no longer exists, or when its heartbeat is older than six beats (at least 30 s)."""
        from echo4o.queue import submit

        max_age = max(30.0, 6 * self.settings.worker_heartbeat_s)
        requeued: list[str] = []
        with session_scope(self.settings.database_url) as s:
            stale = {j.id: j for j in crud.stale_running_jobs(session=s, max_age_s=max_age)}
            for job in s.scalars(sa.select(Job).where(Job.status == "running")).all():
                if job.id not in stale and _is_dead_local_worker(job.worker, self.hostname):
                    stale[job.id] = job
            for job in stale.values():
                if crud.requeue_job(session=s, job_id=job.id):
                    submit(job.id, job.kind, job.priority)
                    requeued.append(job.id)
                    log.warning(
                        "requeued a job whose worker is gone",
                        extra={"job_id": job.id, "dead_worker": job.worker, "attempts": job.attempts},
                    )
        return requeued


def _is_dead_local_worker(worker: str | None, hostname: str) -> bool:
    if not worker:
        return True
    host, _, pid = worker.rpartition(":")
    if host != hostname or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _device_name(device: str) -> str:
    """A label for the ``gpu`` column: the CUDA device's name, or the device itself."""
    if device.startswith("cuda"):
        try:
            import torch

            index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
            return f"{device} ({torch.cuda.get_device_name(index)})"
        except Exception:  # noqa: BLE001 - the label is informational
            return device
    return device


def preview_png(image: Any, max_side: int = 128) -> bytes:
    """A small PNG of a PIL preview image, for the job row."""
    img = image.copy()
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def set_runtime(runtime: WorkerRuntime | None) -> None:
    global _runtime
    with _runtime_lock:
        _runtime = runtime


def current_runtime() -> WorkerRuntime | None:
    """This process's runtime if one was made (never makes one)."""
    return _runtime


def get_runtime() -> WorkerRuntime:
    """This process's runtime; created and loaded on first use when the process was not started by
    ``echo4o worker`` (for example a Celery worker started by hand)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            rt = WorkerRuntime()
            rt.register()
            rt.load()
            rt.set_status("ready")
            _runtime = rt
        return _runtime


def run_worker(*, queues: list[str], loglevel: str = "INFO") -> int:
    """Run ``echo4o worker`` in this process until it is stopped; returns the exit code."""
    from celery import signals

    from worker.celery_app import QUEUES, get_app
    from worker.engine.loading import CheckpointError

    settings = get_settings()
    bad = [q for q in queues if q not in QUEUES]
    if bad or not queues:
        raise ValueError(f"--queues must be a comma-separated subset of {','.join(QUEUES)}, got {queues}")

    runtime = WorkerRuntime(settings=settings, queues=queues)
    runtime.register()
    set_runtime(runtime)
    try:
        if "gpu" in queues:
            runtime.load()
            runtime.warm_up()
        if settings.embedded_broker:
            runtime.recover_orphans()

        app = get_app()

        def _ready(**_: Any) -> None:
            freeze_long_lived("worker")  # the model, the warm-up's allocations, Celery: no full collection walks them
            runtime.set_status("ready")
            log.info(
                "worker ready",
                extra={"worker": runtime.worker_id, "queues": ",".join(queues), "broker": _broker(app)},
            )

        def _shutting_down(**_: Any) -> None:
            runtime.begin_shutdown()

        signals.worker_ready.connect(_ready, weak=False)
        signals.worker_shutting_down.connect(_shutting_down, weak=False)
        argv = [
            "worker",
            "--queues",
            ",".join(queues),
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "--hostname",
            f"echo4o-{os.getpid()}@{runtime.hostname}",
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
        try:
            app.worker_main(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0
    except (ValueError, CheckpointError):  # a bad setting, or weights that cannot be had: the CLI prints the
        raise  # message (it names the fix) as one line and exits with a code of its own
    except Exception:
        log.exception("worker failed", extra={"worker": runtime.worker_id})
        raise
    finally:
        runtime.stop()


def _broker(app: Any) -> str:
    from echo4o.settings import mask_url_password

    return mask_url_password(str(app.conf.broker_url))
