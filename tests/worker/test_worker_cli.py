"""`echo4o worker` refuses bad options before loading anything, naming the option and the fix."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echo4o", "worker", *args], capture_output=True, text=True, timeout=120
    )


def test_unknown_queue_is_refused() -> None:
    res = _run("--queues", "gpu,cpu")
    assert res.returncode == 2
    assert "--queues must be a comma-separated subset of gpu,train" in res.stderr


def test_help_lists_the_options() -> None:
    res = _run("--help")
    assert res.returncode == 0
    for option in ("--queues", "--gpu", "--model"):
        assert option in res.stdout
    assert "--concurrency" not in res.stdout  # one job at a time; one worker per GPU instead
