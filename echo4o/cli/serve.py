"""``echo4o serve`` (the HTTP gateway) and ``echo4o keys create|list|revoke`` (API keys)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import typer

from echo4o.cli import app
from echo4o.jobs import QUEUE_OF_KIND

keys_app = typer.Typer(help="Create, list and revoke API keys (stored hashed in the job database).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

WORKER_STOP_TIMEOUT_S = 30.0
#: Least seconds between two starts of an embedded worker that keeps dying at once.
EMBEDDED_RESTART_S = 30.0
#: How long a stopping gateway lets in-flight requests finish (a submit with ?wait longer than this is cut off);
#: below Docker's and Kubernetes' default grace before SIGKILL (10 s and 30 s).
GRACEFUL_SHUTDOWN_S = 8
#: Idle keep-alive connections are closed after this many seconds.
KEEP_ALIVE_S = 5


def _settings_with(**overrides: object):  # noqa: ANN202 - Settings, imported lazily
    """Flags override the environment; children (the embedded worker) inherit them the same way."""
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"ECHO4O_{name.upper()}"] = str(value)
    from echo4o.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


@app.command()
def serve(
    model: str | None = typer.Option(
        None, "--model", help="Model folder (BAGEL layout, or one made by `echo4o make-tiny`) or Hub id."
    ),
    host: str | None = typer.Option(None, "--host", help="Address to bind (default ECHO4O_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help="Port (default ECHO4O_PORT, 8000)."),
) -> None:
    """Run the HTTP gateway. With no ECHO4O_BROKER_URL it also starts one worker process next to it for both
    queues, image and fine-tuning jobs one at a time (embedded broker on SQLite: nothing else to install); with a
    broker it only enqueues, and `echo4o worker` processes run the jobs."""
    settings = _settings_with(model=model, host=host, port=port)
    from echo4o.logging import get_logger, setup_logging

    setup_logging(settings.log_level, settings.log_format)
    log = get_logger("echo4o.serve")
    try:
        settings.check_bind(settings.host)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    from echo4o.db import crud, session_scope, upgrade_to_head

    upgrade_to_head(settings.database_url)
    if settings.auth == "keys":
        with session_scope(settings.database_url) as s:
            if not crud.list_api_keys(session=s):
                log.warning("no API keys exist yet: every request will get 401. Create one with "
                            "`echo4o keys create --admin`, or run a local demo with ECHO4O_AUTH=off")

    import uvicorn

    from backend.app import create_app
    from backend.serving import for_serving

    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish for GRACEFUL_SHUTDOWN_S and ends event
    # streams (cleanly: backend.serving.EndStreamsCleanly); bodies have ECHO4O_BODY_TIMEOUT_S to arrive.
    options = dict(host=settings.host, port=settings.port, log_config=None, access_log=settings.log_level == "DEBUG",
                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, timeout_keep_alive=KEEP_ALIVE_S)
    # the processes of ECHO4O_GATEWAY_PROCESSES are started afresh: they build the app from the same environment
    os.environ["ECHO4O_DATA_DIR"] = str(settings.data_dir)
    processes = settings.gateway_processes
    config = (uvicorn.Config("backend.serving:serving_app", factory=True, workers=processes, **options)
              if processes > 1 else uvicorn.Config(for_serving(create_app(settings), settings, heap=True), **options))
    server = uvicorn.Server(config)
    run, stop = server.run, lambda: setattr(server, "should_exit", True)
    metrics_dir = None
    if processes > 1:
        # uvicorn's supervisor: one listening socket, that many processes accepting on it, each restarted when it
        # dies; SIGTERM ends each gracefully. It installs its own signal handlers and returns once all are gone.
        from uvicorn.supervisors import Multiprocess

        from backend.metrics import MULTIPROC_ENV

        # the processes keep their metrics in one fresh folder, so /metrics on any of them gives the sum
        metrics_dir = tempfile.mkdtemp(prefix="echo4o-gateway-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        run, stop = supervisor.run, supervisor.should_exit.set
        log.info("gateway processes", extra={"processes": processes, "port": settings.port})
    else:
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down; with these handlers that returns here, so the
        # embedded worker is stopped (warm) before the command exits instead of being orphaned
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _note_signal)
    worker, startup_failure = None, threading.Event()
    if settings.embedded_broker:
        worker = _start_embedded_worker(log, stop, startup_failure)
    try:
        run()
    finally:
        if worker is not None:
            _stop_worker(worker, log)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if worker is not None and startup_failure.is_set():
        # the worker printed the one `error:` line naming the fix; a gateway whose only worker cannot start
        # would accept jobs that never run
        log.warning("gateway stopped: its only worker could not start", extra={"exit_code": worker.returncode})
        raise typer.Exit(worker.returncode)


#: The embedded worker serves every queue: without a broker it is the only worker there is.
EMBEDDED_QUEUES = ",".join(dict.fromkeys(QUEUE_OF_KIND.values()))


def _note_signal(signum: int, _frame: object) -> None:
    """Shutdown signals after uvicorn has stopped: nothing left to do but the cleanup in ``serve``."""


class _EmbeddedWorker:
    """The embedded worker child, started again when it dies (a crash, an OOM kill): its replacement requeues the
    job the dead one was running as it starts (``WorkerRuntime.recover_orphans``), so the job runs again."""

    def __init__(self, log, stop_gateway: Callable[[], None], startup_failure: threading.Event) -> None:  # noqa: ANN001
        self.log, self.stop_gateway, self.startup_failure = log, stop_gateway, startup_failure
        self.stopping = threading.Event()
        self.proc = self._spawn()
        threading.Thread(target=self._watch, name="embedded-worker-watch", daemon=True).start()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "echo4o", "worker", "--queues", EMBEDDED_QUEUES]
        from backend.metrics import MULTIPROC_ENV

        env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}  # the gateway's metrics only
        proc = subprocess.Popen(args, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.log.info("embedded worker started", extra={"pid": proc.pid, "broker": "embedded (SQLite)"})
        return proc

    def _watch(self) -> None:
        from echo4o.cli.worker import STARTUP_FAILURES

        restarted_at = None
        while True:
            code = self.proc.wait()
            if code in STARTUP_FAILURES:
                self.startup_failure.set()
                self.stop_gateway()
                return
            if self.stopping.is_set() or code in (0, -signal.SIGTERM, -signal.SIGINT):
                return
            # a restarted worker that dies again soon (say, at every model load) is restarted at most every 30 s
            again = restarted_at is not None and time.monotonic() - restarted_at < EMBEDDED_RESTART_S
            delay = EMBEDDED_RESTART_S if again else 1.0
            self.log.error("embedded worker died; starting another (it reruns the job that was running). Its log "
                           "is above", extra={"pid": self.proc.pid, "exit_code": code, "restart_in_s": delay})
            if self.stopping.wait(delay):
                return
            restarted_at = time.monotonic()
            self.proc = self._spawn()


def _start_embedded_worker(log, stop_gateway: Callable[[], None],  # noqa: ANN001
                           startup_failure: threading.Event) -> _EmbeddedWorker:
    """Start ``echo4o worker --queues gpu,train`` as a child (the only worker: it takes every kind of job), and
    again whenever it dies. When it exits with a startup-failure code (a bad setting, a model that cannot be had),
    ``startup_failure`` is set and the gateway stopped (``stop_gateway``)."""
    return _EmbeddedWorker(log, stop_gateway, startup_failure)


def _die_with_parent() -> None:
    """Linux: the embedded worker gets SIGTERM if the gateway dies without stopping it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_worker(worker: _EmbeddedWorker, log) -> None:  # noqa: ANN001 - a logging.Logger
    worker.stopping.set()
    proc = worker.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown: a running job finishes first
        try:
            proc.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("embedded worker did not stop in time; killing it", extra={"pid": proc.pid})
            proc.kill()
            proc.wait()
    log.info("embedded worker stopped", extra={"pid": proc.pid, "exit_code": proc.returncode})


# --- keys ------------------------------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(
    admin: bool = typer.Option(False, "--admin", help="May see every key's jobs, workers and the queue."),
    name: str = typer.Option("default", "--name", help="A label to recognise the key by (1..200 characters)."),
) -> None:
    """Make a key and print it on stdout (only this once: it is stored hashed)."""
    settings = _settings_with()
    from echo4o.db import crud, session_scope, upgrade_to_head

    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        try:
            row, key = crud.create_api_key(session=s, name=name, is_admin=admin)
        except ValueError as exc:
            typer.echo(f"error: --name: {exc}", err=True)
            raise typer.Exit(2) from exc
    typer.echo(key)
    typer.echo(f"created {'admin' if admin else 'user'} key {row.id} ({name!r}); store it now, it is not shown again",
               err=True)


@keys_app.command("list")
def keys_list(
    include_revoked: bool = typer.Option(False, "--all", help="Include revoked keys."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array."),
) -> None:
    """Show keys (id, name, prefix, role, dates); never the keys themselves."""
    settings = _settings_with()
    from echo4o.db import crud, session_scope, upgrade_to_head

    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        rows = crud.list_api_keys(session=s, include_revoked=include_revoked)
        items = [
            {"id": r.id, "name": r.name, "prefix": r.prefix, "admin": r.is_admin,
             "created_at": r.created_at.isoformat(), "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None}
            for r in rows
        ]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo("no keys; create one with `echo4o keys create [--admin]`")
        return
    for it in items:
        role = "admin" if it["admin"] else "user"
        revoked = f"  revoked {it['revoked_at'][:19]}" if it["revoked_at"] else ""
        typer.echo(f"{it['id']}  {it['prefix']}...  {role:<5}  {it['created_at'][:19]}  {it['name']}{revoked}")


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (or its displayed prefix).")) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    settings = _settings_with()
    from echo4o.db import crud, session_scope, upgrade_to_head

    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        if not crud.revoke_api_key(session=s, key_id=key_id):
            typer.echo(f"error: no active key with id or prefix {key_id!r}; see `echo4o keys list`", err=True)
            raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")
