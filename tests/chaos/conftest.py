"""The chaos suite (marker ``chaos``, set by each module's ``pytestmark``): the figures of each run (jobs submitted,
kills, restarts, jobs lost, duplicates, most attempts, wall time) are printed in the terminal summary, with or
without ``-s``."""

from __future__ import annotations

import pytest

from tests.chaos.harness import FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("chaos figures")
    for figures in FIGURES:
        terminalreporter.write_line(figures.line())
        for event in figures.timeline:
            terminalreporter.write_line(f"    {event}")
