"""A live stack for tests: the gateway (``echo4o serve`` as a uvicorn subprocess on a free port), worker
subprocess(es) and a model folder (the tiny one), with an admin key and two user keys made beforehand.

    from tests.support.stack import live_stack

    @pytest.fixture(scope="module")
    def stack(tiny_model, tmp_path_factory):
        with live_stack(model=tiny_model, data_dir=tmp_path_factory.mktemp("stack"),
                        broker_url="redis://127.0.0.1:6379/3") as s:
            yield s

    def test_something(stack):
        with stack.client() as c:                 # httpx.Client on stack.url with the user key
            job = c.post("/generate", json={...}).json()
        stack.wait_job(job["id"])                  # polls GET /jobs/{id} until it ends; returns the Job JSON

* ``broker_url=None`` (default): embedded mode, no Redis: ``echo4o serve`` starts its own worker child, the
  way a user's first ``echo4o serve`` does. ``broker_url="redis://..."``: the gateway only enqueues and
  ``workers`` ``echo4o worker`` subprocesses (tests/support/worker_proc.py) run the jobs. Two stacks alive
  at once need two Redis databases (``redis://.../1``, ``.../2``): on one, each would run the other's jobs.
* ``database_url=None``: SQLite in ``data_dir``; pass the ``postgres_url`` fixture for PostgreSQL.
* Keys: ``stack.admin_key``, ``stack.user_key``, ``stack.other_key`` (a second user, for 403 tests);
  ``stack.client(key)`` takes one of them, another string, or ``None`` (no auth header).
* ``env`` adds ECHO4O_* settings for every process (limits, ``ECHO4O_AUTH=off``, ...).
* Start waits until ``GET /readyz`` answers 200 (broker, database and a ready worker); a process that dies
  first fails the start with its log tail. ``stack.logs()`` gives every process's log for failure messages.
* Faults (tests/chaos/): ``stack.restart_gateway()`` kills the gateway (SIGKILL: a crash) and starts it again
  on the same port, data dir and database; ``stack.add_worker()`` starts one more ``echo4o worker`` with the
  stack's settings; ``stack.kill_worker(w)`` SIGKILLs one and keeps its log in ``stack.dead_workers``;
  ``stack.gateway_children()`` are the pids of the gateway's children (embedded mode: its worker).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from echo4o.jobs import TERMINAL_STATUSES
from tests.support.worker_proc import POLL_S, REPO_ROOT, WAIT_S, WorkerProcess


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without stray ECHO4O_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO4O_") or k.startswith("ECHO4O_TEST_")}
    env["PYTHONUNBUFFERED"] = "1"
    # one torch thread per process: a gateway, its workers and pytest share two cores here, and torch's
    # threads fighting over them made a tiny job take seconds instead of ~0.1 s
    env.setdefault("OMP_NUM_THREADS", "1")
    pythonpath = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
    env.update(extra)
    return env


@dataclass
class Stack:
    url: str
    data_dir: Path
    database_url: str
    broker_url: str | None
    model: Path
    env: dict[str, str]
    admin_key: str = ""
    user_key: str = ""
    other_key: str = ""
    gateway: subprocess.Popen[bytes] | None = None
    gateway_log: Path | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    #: Workers ended by :meth:`kill_worker`: no longer checked by :meth:`check_alive`, their logs still shown.
    dead_workers: list[WorkerProcess] = field(default_factory=list)

    # --- clients ---------------------------------------------------------------------------------------
    def headers(self, key: str | None = "user") -> dict[str, str]:
        key = {"user": self.user_key, "admin": self.admin_key, "other": self.other_key}.get(key or "", key)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def client(self, key: str | None = "user", timeout: float = 120.0) -> httpx.Client:
        """An httpx client on the gateway: ``key`` is "user", "admin", "other", a key string or None."""
        return httpx.Client(base_url=self.url, headers=self.headers(key), timeout=timeout)

    def wait_job(self, job_id: str, *, key: str | None = "user", timeout_s: float = WAIT_S,
                 statuses: tuple[str, ...] = TERMINAL_STATUSES) -> dict[str, Any]:
        """Poll ``GET /jobs/{id}`` until its status is one of ``statuses``; the Job JSON."""
        deadline = time.monotonic() + timeout_s
        with self.client(key) as c:
            while True:
                r = c.get(f"/jobs/{job_id}")
                if r.status_code != 200:
                    raise StackError(f"GET /jobs/{job_id} answered {r.status_code}: {r.text}")
                job = r.json()
                if job["status"] in statuses:
                    return job
                self.check_alive()
                if time.monotonic() > deadline:
                    raise StackError(f"job {job_id} still {job['status']} after {timeout_s} s\n{self.logs()}")
                time.sleep(POLL_S)

    # --- processes -------------------------------------------------------------------------------------
    def check_alive(self) -> None:
        if self.gateway is not None and self.gateway.poll() is not None:
            raise StackError(f"the gateway exited with code {self.gateway.returncode}\n{self.logs()}")
        for w in self.workers:
            if not w.alive():
                raise StackError(f"worker {w.pid} exited\n{self.logs()}")

    def logs(self, lines: int = 80) -> str:
        parts = []
        if self.gateway_log is not None and self.gateway_log.exists():
            text = self.gateway_log.read_text(errors="replace").splitlines()[-lines:]
            parts.append("--- gateway (and embedded worker) log ---\n" + "\n".join(text))
        for w in self.workers:
            parts.append(f"--- worker {w.pid} log ---\n{w.tail(lines)}")
        for w in self.dead_workers:
            parts.append(f"--- worker {w.pid} (killed) log ---\n{w.tail(lines)}")
        return "\n".join(parts)

    # --- faults ----------------------------------------------------------------------------------------
    def add_worker(self, *, wait: bool = False, env: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start one more ``echo4o worker`` with the stack's settings (plus ``env``); ``wait``: until it is
        ready. Its log is ``<data_dir>/worker-<n>.log``."""
        n = len(self.workers) + len(self.dead_workers)
        settings_env = {**self.env, **dict(env or {})}
        w = WorkerProcess(env=settings_env, model=self.model, log_path=self.data_dir / f"worker-{n}.log",
                          database_url=self.database_url)
        w.env = _base_env({**settings_env, "PYTHONUNBUFFERED": "1"})
        self.workers.append(w.start())
        if wait:
            w.wait_ready()
        return w

    def kill_worker(self, worker: WorkerProcess) -> int:
        """SIGKILL ``worker`` (a crash) and move it to :attr:`dead_workers`; returns its exit code."""
        code = worker.kill()
        self.workers.remove(worker)
        self.dead_workers.append(worker)
        return code

    def restart_gateway(self, *, sig: int = signal.SIGKILL, ready_timeout_s: float = WAIT_S) -> None:
        """Stop the gateway with ``sig`` (default SIGKILL: a crash, nothing cleaned up), then start it again on
        the same port with the same settings (data dir, database, broker); waits for ``/readyz``."""
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(sig)
            try:
                self.gateway.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
        _start_gateway(self)
        _wait_ready(self, ready_timeout_s)

    def gateway_children(self) -> list[int]:
        """Pids of the gateway's live child processes (embedded mode: its worker), read from /proc."""
        if self.gateway is None or self.gateway.poll() is not None:
            return []
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):  # gone meanwhile
                continue
            if int(fields[1]) == self.gateway.pid and fields[0] not in ("Z", "X"):
                children.append(int(stat.parent.name))
        return sorted(children)

    def stop(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.stop(timeout_s=30)
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)  # stops its embedded worker too
            try:
                self.gateway.wait(timeout=45)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.gateway.pid, signal.SIGKILL)
                self.gateway.wait()


def _create_keys(stack: Stack) -> None:
    from echo4o.db import crud, session_scope, upgrade_to_head

    upgrade_to_head(stack.database_url)
    with session_scope(stack.database_url) as s:
        stack.admin_key = crud.create_api_key(session=s, name="test-admin", is_admin=True)[1]
        stack.user_key = crud.create_api_key(session=s, name="test-user")[1]
        stack.other_key = crud.create_api_key(session=s, name="test-other-user")[1]


def start_stack(
    *,
    model: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    database_url: str | None = None,
    broker_url: str | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = WAIT_S,
) -> Stack:
    """Start a gateway and its worker(s); returns once ``/readyz`` is 200. Call ``stop()`` (or use
    :func:`live_stack`)."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{data_dir / 'echo4o.db'}"
    port = free_port()
    settings_env = {
        "ECHO4O_DATA_DIR": str(data_dir),
        "ECHO4O_DATABASE_URL": database_url,
        "ECHO4O_MODEL": str(model),
        "ECHO4O_HOST": "127.0.0.1",
        "ECHO4O_PORT": str(port),
        "ECHO4O_DEVICE": "cpu",
        "ECHO4O_RATE_LIMIT_PER_MINUTE": "100000",
        "ECHO4O_MAX_QUEUED_JOBS_PER_KEY": "10000",
        "ECHO4O_LOG_LEVEL": "INFO",
        **({"ECHO4O_BROKER_URL": broker_url} if broker_url else {}),
        **dict(env or {}),
    }
    stack = Stack(url=f"http://127.0.0.1:{port}", data_dir=data_dir, database_url=database_url,
                  broker_url=broker_url, model=Path(model), env=settings_env)
    try:
        if settings_env.get("ECHO4O_AUTH", "keys") != "off":
            _create_keys(stack)
        if broker_url:
            for i in range(workers):
                w = WorkerProcess(env=settings_env, model=model, log_path=data_dir / f"worker-{i}.log",
                                  database_url=database_url)
                w.env = _base_env({**settings_env, "PYTHONUNBUFFERED": "1"})
                stack.workers.append(w.start())
        _start_gateway(stack)
        _wait_ready(stack, ready_timeout_s)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start_gateway(stack: Stack) -> None:
    """``echo4o serve`` with the stack's settings, its output appended to ``<data_dir>/gateway.log``."""
    stack.gateway_log = stack.data_dir / "gateway.log"
    with open(stack.gateway_log, "ab") as log:
        stack.gateway = subprocess.Popen(
            [sys.executable, "-m", "echo4o", "serve", "--model", str(stack.model)],
            env=_base_env(stack.env), stdout=log, stderr=subprocess.STDOUT, cwd=str(stack.data_dir),
            start_new_session=True,
        )


def _wait_ready(stack: Stack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        stack.check_alive()
        try:
            r = httpx.get(f"{stack.url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise StackError(f"stack not ready after {timeout_s:.0f} s (last /readyz: {last})\n{stack.logs()}")
        time.sleep(0.25)


@contextlib.contextmanager
def live_stack(**kwargs: Any) -> Iterator[Stack]:
    """:func:`start_stack` as a context manager: stops every process on exit."""
    stack = start_stack(**kwargs)
    try:
        yield stack
    finally:
        stack.stop()


@contextlib.contextmanager
def fresh_database(postgres_url: str) -> Iterator[str]:
    """An empty PostgreSQL database next to the session's, dropped afterwards: job counts and queue
    positions are global, so these tests need tables no other test wrote to."""
    import sqlalchemy as sa

    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"echo4o_gw_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        from echo4o.db import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
