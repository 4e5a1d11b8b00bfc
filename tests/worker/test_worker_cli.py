"""`echo4o worker` refuses bad options before loading anything, and an attention backend that cannot run as it
loads the model, naming the option and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echo4o", "worker", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
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


def test_a_worker_asked_for_attention_that_cannot_run_here_refuses_to_start(tiny_model: Path) -> None:
    """ECHO4O_ATTENTION=xformers on this CPU machine: the worker loads the model, its attention check refuses,
    and it exits 2 with one line naming why and the fix (it never takes a job it would fail)."""
    res = _run("--queues", "gpu", env={"ECHO4O_ATTENTION": "xformers", "ECHO4O_MODEL": str(tiny_model)})
    assert res.returncode == 2, res.stderr
    [error] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: attention backend 'xformers' cannot run here: xformers has no kernel for "
                            "device 'cpu' (it needs CUDA)")
    assert "ECHO4O_ATTENTION=sdpa" in error and "xformers==0.0.35" in error
