"""Helpers shared by the worker tests: a real worker's environment and job submission through the queue."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from echo4o import queue
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.jobs import ACTIVE_STATUSES, MAX_NUM_IMAGES, MAX_STEPS, MIN_SIDE, parse_job
from echo4o.settings import get_settings
from tests.support.worker_proc import WorkerProcess, wait_for_job

#: A job that outlasts any cancel: the most steps and images at the smallest size, hundreds of tiny-model
#: steps (seconds even on a fast machine). Tests cancel it once it has reported its first step.
UNTIL_CANCELLED: dict[str, int] = {
    "height": MIN_SIDE, "width": MIN_SIDE, "num_steps": MAX_STEPS, "num_images": MAX_NUM_IMAGES,
}
#: A job to SIGKILL mid-run and then run again to the end: the most steps at the smallest size, one image.
KILLABLE: dict[str, int] = {"height": MIN_SIDE, "width": MIN_SIDE, "num_steps": MAX_STEPS}
#: A job of a few steps.
QUICK: dict[str, int] = {"height": 32, "width": 32, "num_steps": 3}


def worker_env(data_dir: Path, tiny_model: Path, **extra: str) -> dict[str, str]:
    """Settings for a test stack: its own data dir, the tiny model on CPU, fast heartbeats, previews."""
    return {
        "ECHO4O_DATA_DIR": str(data_dir),
        "ECHO4O_MODEL": str(tiny_model),
        "ECHO4O_DEVICE": "cpu",
        "ECHO4O_WORKER_HEARTBEAT_S": "1",
        "ECHO4O_PREVIEW_EVERY": "1",
        **extra,
    }


@contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Exactly ``env`` as this process's ECHO4O_* settings (for module-scoped stacks)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("ECHO4O_") and not key.startswith("ECHO4O_TEST_"):
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()


def use_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()


def submit(kind: str = "generate", **params: Any) -> str:
    """Validate like the gateway, write the row, enqueue; returns the job id."""
    payload = parse_job(kind, params)
    return submit_raw(kind, payload.model_dump(mode="json"), priority=payload.priority)


def submit_raw(kind: str, params: dict[str, Any], priority: int = 5) -> str:
    """Write a row with ``params`` as given (no validation: a tampered or outdated payload) and enqueue it."""
    upgrade_to_head()
    with session_scope() as s:
        job = crud.create_job(
            session=s, kind=kind, params=params, model_version=get_settings().model_version, priority=priority
        )
    queue.submit(job.id, kind, priority)
    return job.id


def cancel(job_id: str):
    with session_scope() as s:
        return crud.request_cancel(session=s, job_id=job_id)


def job_row(job_id: str):
    with session_scope() as s:
        return crud.get_job(session=s, job_id=job_id)


def private_redis_url(offset: int) -> str:
    """A flushed Redis database index for one test module, away from the one the ``redis_url`` fixture
    (pid-based) flushes around each test."""
    base = os.environ.get("ECHO4O_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
    url = f"{base}/{1 + (os.getpid() + offset) % 15}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
        client.flushdb()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {url} ({exc}). Start it: redis-server --daemonize yes --port 6379, "
            "or point ECHO4O_TEST_REDIS_URL at one."
        )
    finally:
        client.close()
    return url


def start_ready_worker(env: Mapping[str, str], log_name: str = "worker.log") -> WorkerProcess:
    """An ``echo4o worker`` with exactly ``env`` as its settings, started and ready; killed if it never gets ready.
    Its log is ``<ECHO4O_DATA_DIR>/<log_name>``."""
    with environment(env):
        worker = WorkerProcess(model=env["ECHO4O_MODEL"], log_path=Path(env["ECHO4O_DATA_DIR"]) / log_name).start()
        try:
            worker.wait_ready()
        except BaseException:
            if worker.alive():
                worker.kill()
            raise
    return worker


def settle_jobs(worker: WorkerProcess) -> None:
    """Cancel every queued or running job of the current database and wait until each has ended, so a test
    sharing ``worker`` with others starts (and leaves) it idle, with nothing waiting."""
    with session_scope() as s:
        active = [job.id for status in ACTIVE_STATUSES
                  for job in crud.list_jobs(session=s, status=status, limit=1000)[0]]
    for job_id in active:
        cancel(job_id)
    for job_id in active:
        wait_for_job(job_id, worker=worker)
