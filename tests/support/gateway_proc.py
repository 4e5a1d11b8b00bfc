"""``echo4o serve`` alone, as a subprocess on a free port, for tests of the HTTP server itself (shutdown, slow
clients, bodies on a real socket): Redis as broker so no embedded worker starts, SQLite in ``data_dir``, an admin
key made beforehand. Ready once ``/healthz`` answers (no worker runs, so ``/readyz`` never would).

    gw = start_gateway(tmp_path, redis_url, body_timeout_s="2")
    try:
        httpx.get(f"{gw.url}/jobs", headers=gw.headers())
    finally:
        gw.kill()
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from echo4o.db import crud, session_scope, upgrade_to_head
from tests.support.stack import _base_env, free_port

START_TIMEOUT_S = 60.0


@dataclass
class GatewayProcess:
    url: str
    host: str
    port: int
    key: str
    database_url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def answering_pids(self) -> set[str]:
        """The processes named in the gateway's submit log lines (the whole log: :meth:`tail` keeps only its end)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return {line.split("pid=")[1].split()[0] for line in lines if "job submitted" in line and "pid=" in line}

    def job_count(self) -> int:
        with session_scope(self.database_url) as s:
            return crud.list_jobs(session=s, owner=None, limit=1, offset=0)[1]

    def kill(self) -> None:
        """SIGKILL the gateway and every process it started: its process group (a multi-process gateway's
        processes outlive a supervisor killed alone, orphaned, still holding memory)."""
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_gateway(data_dir: Path, broker_url: str, **env: str) -> GatewayProcess:
    """``echo4o serve`` with ``env`` as extra settings (``wait_max_s="30"`` -> ECHO4O_WAIT_MAX_S)."""
    database_url = f"sqlite:///{data_dir / 'echo4o.db'}"
    upgrade_to_head(database_url)
    with session_scope(database_url) as s:
        key = crud.create_api_key(session=s, name="gateway-test", is_admin=True)[1]
    port = free_port()
    settings = {"ECHO4O_DATA_DIR": str(data_dir), "ECHO4O_DATABASE_URL": database_url, "ECHO4O_BROKER_URL": broker_url,
                "ECHO4O_HOST": "127.0.0.1", "ECHO4O_PORT": str(port), "ECHO4O_MODEL": str(data_dir / "no-model"),
                **{f"ECHO4O_{k.upper()}": v for k, v in env.items()}}
    log = data_dir / "gateway.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "echo4o", "serve"], env=_base_env(settings), stdout=out,
                                stderr=subprocess.STDOUT, cwd=str(data_dir), start_new_session=True)
    gw = GatewayProcess(f"http://127.0.0.1:{port}", "127.0.0.1", port, key, database_url, proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}:\n{gw.tail()}")
        try:
            if httpx.get(f"{gw.url}/healthz", timeout=2).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            gw.kill()
            raise RuntimeError(f"the gateway did not answer /healthz in {START_TIMEOUT_S:.0f} s:\n{gw.tail()}")
        time.sleep(0.2)
