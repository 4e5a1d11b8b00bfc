"""The shipped migrations build exactly the models' schema, idempotently and under concurrency."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from echo4o.db import get_engine, upgrade_to_head
from echo4o.db.migrate import current_revision, head_revision
from echo4o.db.models import Base


def test_migrations_match_models(db_url: str) -> None:
    assert current_revision(db_url) == head_revision()
    assert upgrade_to_head(db_url) == head_revision()  # second run is a no-op
    with get_engine(db_url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations differ; add a migration: {diff}"
    tables = set(sa.inspect(get_engine(db_url)).get_table_names())
    assert {"jobs", "api_keys", "workers", "alembic_version"} <= tables


def test_concurrent_upgrades_on_a_fresh_sqlite_file(data_dir) -> None:
    url = f"sqlite:///{data_dir / 'fresh.db'}"
    code = "import sys; from echo4o.db import upgrade_to_head; print(upgrade_to_head(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == head_revision()
    with get_engine(url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_unreachable_database_names_the_setting() -> None:
    import pytest

    with pytest.raises(RuntimeError, match="ECHO4O_DATABASE_URL"):
        upgrade_to_head("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
