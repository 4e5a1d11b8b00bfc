"""Shared fixtures. Services are real: a test that needs Redis or PostgreSQL fails, naming the
service and how to start it, when it is not reachable; it never skips."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_URL = os.environ.get("ECHO4O_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def redis_base() -> str:
    """The Redis server the tests use: ``ECHO4O_TEST_REDIS_URL``, or the machine's on the standard port."""
    return os.environ.get("ECHO4O_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")


# --- pytest-xdist: each worker process its own Redis ----------------------------------------------------------
_WORKER_REDIS = []


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``) two test modules run at once, and the Redis database indexes each picks
    (1..15, by pid) could coincide: a flush in one would empty the other's queue. So each worker process starts a
    ``redis-server`` of its own on a private port, before any test module reads ``ECHO4O_TEST_REDIS_URL``."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    import tempfile
    from pathlib import Path

    from tests.support.redis_server import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix=f"echo4o-redis-{worker}-")), appendonly=False).start()
    _WORKER_REDIS.append(server)
    os.environ["ECHO4O_TEST_REDIS_URL"] = f"redis://127.0.0.1:{server.port}"


def pytest_unconfigure(config: pytest.Config) -> None:
    while _WORKER_REDIS:
        _WORKER_REDIS.pop().stop()


# --- figures of the run, printed at its end (tests/support/figures.py), also from pytest-xdist workers ---------
_REMOTE_FIGURES: list[dict[str, list[str]]] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.support import figures

    if hasattr(session.config, "workeroutput"):  # an xdist worker: the controller prints them
        session.config.workeroutput["figures"] = figures.collected()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # noqa: ANN001 - xdist's WorkerController
    _REMOTE_FIGURES.append(getattr(node, "workeroutput", {}).get("figures", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.support import figures

    sections: dict[str, list[str]] = {}
    for part in (figures.collected(), *_REMOTE_FIGURES):
        for title, lines in part.items():
            sections.setdefault(title, []).extend(lines)
    for title, lines in sections.items():
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)


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
    base = redis_base()
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
