"""Shared fixtures. Services are real: a test that needs Redis or PostgreSQL fails, naming the
service and how to start it, when it is not reachable; it never skips."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("ECHO4O_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRES_URL = os.environ.get("ECHO4O_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-only tests skip, with the reason, where CUDA is absent; nothing else may skip."""
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    marker = pytest.mark.skipif(True, reason="needs a CUDA device (marked gpu); none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test starts from default settings with its own data dir, whatever the shell exported."""
    from echo4o.settings import get_settings

    for key in list(os.environ):
        if key.startswith("ECHO4O_") and not key.startswith("ECHO4O_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ECHO4O_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # no stray .env is read
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def data_dir() -> Path:
    from echo4o.settings import get_settings

    return get_settings().data_dir


def _redis_client(url: str):
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {url} ({exc}). Start it: redis-server --daemonize yes --port 6379, "
            "or point ECHO4O_TEST_REDIS_URL at one."
        )
    return client


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A private, flushed Redis database index (1..15, picked by pid) for one test."""
    base = REDIS_URL.rstrip("/")
    index = 1 + (os.getpid() % 15)
    url = f"{base}/{index}"
    client = _redis_client(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"echo4o_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc.orig}). Start it: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start, "
            "or point ECHO4O_TEST_POSTGRES_URL at one."
        )
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Echo-4o in the released checkpoint layout, built once per test session."""
    from worker.engine.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "echo4o-tiny", seed=0)
