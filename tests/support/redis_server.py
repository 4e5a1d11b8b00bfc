"""A ``redis-server`` of a test's own, on a private port: the chaos suite kills and restarts it; each pytest-xdist
worker process gets one so that the Redis databases its tests flush are its own (tests/conftest.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.support.stack import free_port

#: How often a start is checked.
POLL_S = 0.05


class RedisServer:
    """``redis-server`` on a private port with an append-only file in ``directory``: what it acknowledged
    survives a SIGKILL and a start on the same port and directory (``appendonly=False``: it keeps nothing)."""

    def __init__(self, directory: Path, port: int | None = None, *, appendonly: bool = True) -> None:
        self.appendonly = appendonly
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes" if self.appendonly else "no",
             "--dir", str(self.dir), "--save", "", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    if client.ping():
                        return self
                except redis.exceptions.BusyLoadingError:  # still replaying the append-only file
                    pass
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server not answering after {timeout_s} s: {self.log_tail()}")
                time.sleep(POLL_S)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        """Kill it and start it again on the same port and append-only directory."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
