"""``echo4o healthcheck worker|url`` (the container health checks of docker-compose.yml) against a real SQLite job
database and a real HTTP server: in-process through the CLI app, and once as the real subprocess a container runs."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.db.models import Worker


@dataclass
class Outcome:
    returncode: int
    stderr: str


def run(*args: str, data_dir: Path) -> Outcome:
    """The command in this process (a subprocess costs seconds each on a loaded machine), settings from the env."""
    from echo4o.cli import app
    from echo4o.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("ECHO4O_") and not k.startswith("ECHO4O_TEST_")]:
            mp.delenv(name)
        mp.setenv("ECHO4O_DATA_DIR", str(data_dir))
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(app, ["healthcheck", *args])
        finally:
            get_settings.cache_clear()
    return Outcome(result.exit_code, result.output)


def test_the_command_runs_as_a_container_runs_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO4O_")} | {"ECHO4O_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "echo4o", "healthcheck", "worker"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("unhealthy: "), out.stderr


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'echo4o.db'}"
    upgrade_to_head(url)
    return url


def add_worker(url: str, *, status: str, age_s: float = 0.0, hostname: str | None = None) -> None:
    hostname = hostname or socket.gethostname()
    with session_scope(url) as s:
        crud.upsert_worker(session=s, worker_id=f"{hostname}:{os.getpid()}", hostname=hostname, queues="gpu",
                           status=status)
        s.execute(sa.update(Worker).values(heartbeat_at=crud.utcnow() - timedelta(seconds=age_s)))
        s.commit()


def test_worker_check_follows_this_hosts_heartbeat(tmp_path: Path, database: str) -> None:
    out = run("worker", data_dir=tmp_path)
    assert out.returncode == 1 and "no worker of host" in out.stderr
    add_worker(database, status="loading")
    assert run("worker", data_dir=tmp_path).returncode == 0  # alive while it loads the model
    out = run("worker", "--ready", data_dir=tmp_path)
    assert out.returncode == 1 and "'loading'" in out.stderr
    add_worker(database, status="ready")
    assert run("worker", "--ready", data_dir=tmp_path).returncode == 0
    add_worker(database, status="busy", age_s=120)  # silent for two minutes
    out = run("worker", data_dir=tmp_path)
    assert out.returncode == 1 and "last heartbeat" in out.stderr


def test_worker_check_ignores_other_hosts(tmp_path: Path, database: str) -> None:
    add_worker(database, status="ready", hostname="another-host")
    assert run("worker", data_dir=tmp_path).returncode == 1
    assert run("worker", "--hostname", "another-host", data_dir=tmp_path).returncode == 0


def test_worker_check_without_a_database_says_so(tmp_path: Path) -> None:
    out = run("worker", data_dir=tmp_path / "nowhere")
    assert out.returncode == 1 and "ECHO4O_DATABASE_URL" in out.stderr


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_check(tmp_path: Path, http_server: str) -> None:
    assert run("url", f"{http_server}/healthz", data_dir=tmp_path).returncode == 0
    out = run("url", f"{http_server}/readyz", data_dir=tmp_path)
    assert out.returncode == 1 and "503" in out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    out = run("url", f"http://127.0.0.1:{closed}/healthz", "--timeout", "2", data_dir=tmp_path)
    assert out.returncode == 1 and "failed" in out.stderr
