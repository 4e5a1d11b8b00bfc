"""Schema migrations, run programmatically (no alembic.ini): the gateway and each worker call
:func:`upgrade_to_head` at start. Concurrent callers are serialised (a file lock next to a SQLite database,
an advisory lock on PostgreSQL), so processes starting together do not race on the DDL."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

logging.getLogger("alembic").setLevel(logging.WARNING)  # it narrates every import and step at INFO

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402

from echo4o.db.session import get_engine, resolve_url, sqlite_path  # noqa: E402
from echo4o.logging import get_logger  # noqa: E402

log = get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_PG_LOCK_KEY = 0x0EC4_0DB  # any constant shared by every echo4o process


def alembic_config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations found in {MIGRATIONS_DIR}"
    return head


def current_revision(url: str | None = None) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade_to_head(url: str | None = None) -> str:
    """Create or upgrade the schema at ``url`` (default: ``settings.database_url``); returns the revision."""
    url = resolve_url(url)
    engine = get_engine(url)
    db_file = sqlite_path(url)
    lock = _file_lock(db_file.with_name(db_file.name + ".migrate.lock")) if db_file else _nullcontext()
    try:
        with lock, engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            before = MigrationContext.configure(conn).get_current_revision()
            command.upgrade(alembic_config(conn), "head")
            after = MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as exc:
        raise RuntimeError(
            f"cannot reach the database {engine.url.render_as_string(hide_password=True)} ({exc.orig}): "
            "check ECHO4O_DATABASE_URL and that the server is running"
        ) from exc
    if before != after:
        log.info("database migrated", extra={"from_revision": before, "to_revision": after})
    assert after is not None
    return after


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield
