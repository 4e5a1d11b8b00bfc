"""Figures a test run reports (the chaos runs' counts, the OpenAPI fuzz's requests and 5xx), printed in the
terminal summary at the end of the run, with or without ``-s``, and with or without pytest-xdist: a worker
process hands its lines to the controller (``workeroutput``), which prints them all.

A test adds a section's lines with :func:`report`, or :func:`report_later` for lines that are only final at the
end of the run (an object the test keeps filling in, printed also when the test failed half-way)."""

from __future__ import annotations

from collections.abc import Callable

#: section title -> producers of its lines, in the order they were reported.
_SECTIONS: dict[str, list[Callable[[], list[str]]]] = {}


def report(section: str, *lines: str) -> None:
    _SECTIONS.setdefault(section, []).append(lambda: list(lines))


def report_later(section: str, lines: Callable[[], list[str]]) -> None:
    _SECTIONS.setdefault(section, []).append(lines)


def collected() -> dict[str, list[str]]:
    """Every section's lines as they stand now."""
    return {title: [line for producer in producers for line in producer()] for title, producers in _SECTIONS.items()}
