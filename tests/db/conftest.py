"""Every db test runs twice: on a SQLite file and on the session's PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from echo4o.db import dispose_engines, get_engine, upgrade_to_head
from echo4o.db.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, data_dir) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{data_dir / 'records.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_to_head(url)
    with get_engine(url).begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(sa.delete(table))
    yield url
    dispose_engines()
