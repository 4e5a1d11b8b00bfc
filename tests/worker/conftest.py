"""Fixtures of the worker tests that run one real worker per module: a module defines ``stack_env`` (the
settings of its stack, see ``tests.worker.jobs_support.worker_env``) and gets ``module_worker`` (an ``echo4o
worker`` started with them, ready) and ``stack`` (those settings in the test's process, the worker idle and
nothing queued or running before and after the test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.worker_proc import WorkerProcess
from tests.worker.jobs_support import settle_jobs, start_ready_worker, use_env


@pytest.fixture(scope="module")
def module_worker(stack_env: dict[str, str]) -> Iterator[WorkerProcess]:
    worker = start_ready_worker(stack_env)
    yield worker
    worker.stop()


@pytest.fixture
def stack(stack_env: dict[str, str], module_worker: WorkerProcess,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    use_env(monkeypatch, stack_env)
    settle_jobs(module_worker)
    yield stack_env
    settle_jobs(module_worker)
