"""Engines and sessions, one engine per database URL per process.

SQLite runs in WAL mode with a busy timeout so that the gateway and any number of worker processes can
share one file: readers never block the writer, and a writer waits (up to ``SQLITE_BUSY_TIMEOUT_S``)
for another instead of failing with "database is locked".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from echo4o.settings import get_settings

SQLITE_BUSY_TIMEOUT_S = 30

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def resolve_url(url: str | None = None) -> str:
    return url or get_settings().database_url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other backends and in-memory databases)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _set_sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def create_db_engine(url: str) -> Engine:
    """A new engine for ``url`` (prefer :func:`get_engine`, which shares one per URL)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        )
        sa.event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: ``settings.database_url``)."""
    url = resolve_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_db_engine(url)
        return engine


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    url = resolve_url(url)
    with _lock:
        maker = _sessionmakers.get(url)
    if maker is None:
        engine = get_engine(url)
        with _lock:
            maker = _sessionmakers.setdefault(url, sessionmaker(bind=engine, expire_on_commit=False))
    return maker


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that rolls back on error and is always closed. Crud functions commit their own writes."""
    session = get_sessionmaker(url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every pooled connection (after a fork, or at the end of tests)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _sessionmakers.clear()
    for engine in engines:
        engine.dispose()
