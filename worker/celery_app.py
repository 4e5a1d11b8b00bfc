"""The worker's Celery app: the core app (:mod:`echo4o.celery_app`) with the worker's tasks registered.

``celery -A worker.celery_app inspect ...`` finds it as the module attribute ``app``. The gateway never
imports this module; it sends tasks by name through :mod:`echo4o.queue`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from echo4o import celery_app as core
from echo4o.celery_app import QUEUES, TASK_IMAGE, TASK_TRAIN

__all__ = ["QUEUES", "TASK_IMAGE", "TASK_TRAIN", "get_app"]


def get_app() -> Celery:
    """The Celery app for the current settings, with ``worker.tasks`` registered on it."""
    import worker.tasks  # noqa: F401 - its shared tasks attach themselves to every app

    return core.get_app()


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        return get_app()
    raise AttributeError(name)
