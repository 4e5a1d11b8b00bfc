"""echo4o/logging.py: the root handler follows ``sys.stderr`` as it is when a record comes."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from echo4o.logging import setup_logging


@pytest.fixture
def root_as_it_was() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_records_go_to_the_stderr_of_the_moment_not_a_closed_one(root_as_it_was: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in-process (a test's CliRunner) sets logging up while stderr is a capture it closes later;
    later records must not go to that closed stream."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("INFO", "text")
    logging.getLogger("echo4o.test").info("while captured", extra={"n": 1})
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("echo4o.test").info("after the capture closed", extra={"n": 2})
    assert "after the capture closed" in second.getvalue() and "n=2" in second.getvalue()
    assert "Logging error" not in second.getvalue()
