"""Recording the SQL statements a block runs, with the thread each ran on (SQLAlchemy's ``before_cursor_execute``
event on the process-wide engine of a URL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from echo4o.db import get_engine


class StatementLog:
    """Every statement the process-wide engine of a URL executes, with the ident of the thread it ran on."""

    def __init__(self) -> None:
        self.statements: list[tuple[int, str]] = []
        self.first_update = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, conn, cursor, statement: str, parameters, context, executemany) -> None:  # noqa: ANN001
        with self._lock:
            self.statements.append((threading.get_ident(), statement))
        if statement.lstrip().upper().startswith("UPDATE"):
            self.first_update.set()

    def threads(self) -> set[int]:
        with self._lock:
            return {ident for ident, _ in self.statements}

    def on(self, ident: int | None) -> list[str]:
        """The statements that ran on thread ``ident``, in order."""
        with self._lock:
            return [sql for t, sql in self.statements if t == ident]

    def updates_on(self, ident: int | None) -> int:
        with self._lock:
            return sum(1 for t, sql in self.statements if t == ident and sql.lstrip().upper().startswith("UPDATE"))


@contextmanager
def recorded_statements(url: str) -> Iterator[StatementLog]:
    """Record the statements of ``get_engine(url)``, the engine ``session_scope(url)`` (and so the reporter)
    uses, while the block runs."""
    engine = get_engine(url)
    log = StatementLog()
    sa.event.listen(engine, "before_cursor_execute", log)
    try:
        yield log
    finally:
        sa.event.remove(engine, "before_cursor_execute", log)
