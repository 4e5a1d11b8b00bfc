"""Blocking work (SQL, the broker, image decoding) run in a worker thread, so async routes never block the
event loop."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from sqlalchemy.orm import Session

from echo4o.db import get_sessionmaker
from echo4o.settings import Settings

T = TypeVar("T")


async def in_session(settings: Settings, fn: Callable[[Session], T]) -> T:
    """Run ``fn(session)`` in a worker thread with a short-lived session (for async routes)."""

    def run() -> T:
        session = get_sessionmaker(settings.database_url)()
        try:
            return fn(session)
        finally:
            session.close()

    return await anyio.to_thread.run_sync(run)


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))
