"""``echo4o serve`` and ``echo4o worker`` when the model cannot be had: one line naming the fix, no traceback,
a non-zero exit; in embedded mode the gateway does not stay up without its only worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ECHO4O = [sys.executable, "-m", "echo4o"]
DEADLINE_S = 240  # the worker child imports torch and the engine before it finds out; generous on a busy CI box


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHO4O_", "HF_"))} | env
    return subprocess.run([*ECHO4O, *args], capture_output=True, text=True, env=full_env, timeout=DEADLINE_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_serve_stops_when_its_only_worker_cannot_load_the_model(tmp_path: Path):
    out = run("serve", "--port", str(free_port()),
              env={"ECHO4O_MODEL": "/nonexistent", "ECHO4O_DATA_DIR": str(tmp_path), "ECHO4O_AUTH": "off"})
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1, out.stderr
    assert "/nonexistent does not exist" in lines[0] and "echo4o make-tiny" in lines[0]  # the fix
    assert "gateway stopped: its only worker could not start" in out.stderr


def test_worker_with_an_unreachable_hub_model_is_one_line(tmp_path: Path):
    out = run("worker", env={"ECHO4O_MODEL": "nobody/no-such-model", "ECHO4O_DATA_DIR": str(tmp_path),
                             "HF_HUB_OFFLINE": "1", "ECHO4O_LOG_LEVEL": "WARNING"})
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr
    assert error_lines(out.stderr) == out.stderr.strip().splitlines(), out.stderr  # nothing but the error line
    (line,) = error_lines(out.stderr)
    assert "nobody/no-such-model" in line and "huggingface-cli download" in line


def test_worker_has_no_concurrency_option(tmp_path: Path):
    out = run("worker", "--concurrency", "2", env={"ECHO4O_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2 and "No such option: --concurrency" in out.stderr
