"""Run ``echo4o worker`` as a real subprocess in tests.

    with WorkerProcess(env={"ECHO4O_BROKER_URL": redis_url}, model=tiny_model) as w:
        ...  # w.worker_id is its row in `workers`, already ready

The child inherits the test's environment (so the same data dir, database and broker) plus ``env``.
``start()`` then ``wait_ready()`` waits until the worker's row says ``ready`` (model loaded, consuming);
if the process exits first, or the wait runs out, the error carries the tail of its log. ``stop()`` asks
for a warm shutdown (SIGTERM) and kills it if it does not exit; ``kill()`` is SIGKILL (a crash).

``wait_for_job`` waits for a job's status, ``wait_for_progress`` for a running job's first steps (a test
that cancels or kills a job mid-run acts on that event, never after a fixed sleep). Every wait polls a real
condition and has a generous deadline, :data:`WAIT_S`: on one loaded core a worker can be many times slower
than usual, and the deadline only turns a hang into a failure that shows the worker's log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from echo4o.jobs import TERMINAL_STATUSES

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Deadline of every wait on a worker (start, a job's status, a job's progress), in seconds.
WAIT_S = 240.0
#: Pause between two reads of the condition a wait polls.
POLL_S = 0.05
PROGRESS_POLL_S = 0.01


class WorkerProcessError(RuntimeError):
    pass


class WorkerProcess:
    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        queues: str = "gpu",
        model: str | os.PathLike[str] | None = None,
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
        database_url: str | None = None,
    ) -> None:
        # one torch thread per worker (see tests/support/stack.py _base_env)
        self.env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        pythonpath = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
        self.args = [sys.executable, "-m", "echo4o", "worker", "--queues", queues]
        if model is not None:
            self.args += ["--model", str(model)]
        self.args += list(extra_args or [])
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="echo4o-worker-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self._database_url = database_url
        self.proc: subprocess.Popen[bytes] | None = None

    # --- identity --------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        if self.proc is None:
            raise WorkerProcessError("worker not started")
        return self.proc.pid

    @property
    def worker_id(self) -> str:
        """The worker's id in the ``workers`` table (hostname:pid)."""
        return f"{socket.gethostname()}:{self.pid}"

    @property
    def database_url(self) -> str:
        if self._database_url:
            return self._database_url
        # the child's settings rule (echo4o.settings): ECHO4O_DATABASE_URL, else SQLite in the data dir
        url = self.env.get("ECHO4O_DATABASE_URL")
        if url:
            return url
        data_dir = Path(self.env.get("ECHO4O_DATA_DIR", "data")).expanduser().resolve()
        return f"sqlite:///{data_dir / 'echo4o.db'}"

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=os.getcwd(),
            start_new_session=True,
        )
        return self

    def status(self) -> str | None:
        """The worker's row status, or None while the row does not exist yet."""
        import sqlalchemy as sa

        from echo4o.db import session_scope
        from echo4o.db.models import Worker

        try:
            with session_scope(self.database_url) as s:
                return s.scalar(sa.select(Worker.status).where(Worker.id == self.worker_id))
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # database or table not created yet
            return None

    def wait_ready(self, timeout_s: float = WAIT_S) -> WorkerProcess:
        """Wait until the worker's row says ``ready`` or ``busy``; fails with its log if it exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                raise WorkerProcessError(f"worker exited with code {code} before it was ready; log:\n{self.tail()}")
            if self.status() in ("ready", "busy"):
                return self
            if time.monotonic() > deadline:
                raise WorkerProcessError(f"worker not ready after {timeout_s:.0f} s; log:\n{self.tail()}")
            time.sleep(POLL_S)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Warm shutdown (SIGTERM: the running job finishes first); SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL, as a crash or an OOM kill would."""
        assert self.proc is not None
        self.proc.kill()
        code = self.proc.wait()
        self._close_log()
        return code

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    # --- logs ------------------------------------------------------------------------------------
    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def __enter__(self) -> WorkerProcess:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.kill() if self.alive() else None
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _poll_job(job_id: str, done: Callable[[Any], bool], *, what: str, timeout_s: float,
              database_url: str | None, worker: WorkerProcess | None, poll_s: float = POLL_S):
    """Read the job row until ``done(row)``; returns the row. Fails, with the worker's log tail, when the
    worker died or ``timeout_s`` passed."""
    from echo4o.db import crud, session_scope

    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(database_url) as s:
            job = crud.get_job(session=s, job_id=job_id)
        if job is not None and done(job):
            return job
        if worker is not None and not worker.alive():
            raise WorkerProcessError(f"worker died while job {job_id} was {job and job.status}; log:\n{worker.tail()}")
        if time.monotonic() > deadline:
            log = f"; worker log:\n{worker.tail()}" if worker is not None else ""
            raise WorkerProcessError(
                f"job {job_id} still {job and job.status} (step {job and job.progress_step}) after {timeout_s} s, "
                f"waiting for {what}{log}"
            )
        time.sleep(poll_s)


def wait_for_job(job_id: str, *, statuses: tuple[str, ...] = TERMINAL_STATUSES, timeout_s: float = WAIT_S,
                 database_url: str | None = None, worker: WorkerProcess | None = None):
    """Poll the job row until its status is one of ``statuses``; returns the row. Fails with the worker's
    log tail when it runs out of time or the worker died."""
    return _poll_job(job_id, lambda job: job.status in statuses, what=f"status in {statuses}",
                     timeout_s=timeout_s, database_url=database_url, worker=worker)


def wait_for_progress(job_id: str, *, min_step: int = 1, timeout_s: float = WAIT_S,
                      database_url: str | None = None, worker: WorkerProcess | None = None):
    """Poll the job row until the job runs and has reported step ``min_step`` (so it is mid-sampling);
    returns the row. Fails, naming the outcome, when the job ended first: the test's job was too short
    for what it wanted to do mid-run."""

    def reached(job: Any) -> bool:
        if job.status in TERMINAL_STATUSES:
            raise WorkerProcessError(
                f"job {job_id} ended ({job.status}, step {job.progress_step}/{job.progress_total}) before step "
                f"{min_step} was seen running: give it more steps so the test can act mid-run"
            )
        return job.status == "running" and job.progress_step >= min_step

    # a tiny job samples a step in a millisecond or two: poll often, so that the running window is not missed
    return _poll_job(job_id, reached, what=f"step {min_step}", timeout_s=timeout_s, database_url=database_url,
                     worker=worker, poll_s=PROGRESS_POLL_S)
