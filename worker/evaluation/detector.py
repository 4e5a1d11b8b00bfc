"""The object detector that scores GenEval (its published protocol counts, colours and places objects with a
detector, not a judge). No detector ships with this project: one is configured by naming a callable,
``ECHO4O_GENEVAL_DETECTOR=package.module:function`` (or ``echo4o bench --detector``), that takes
``(record, image)`` (a :class:`~worker.evaluation.suites.PromptRecord` and a PIL image) and returns
``{"correct": bool, "reason": str}``. Without one, GenEval images are made and left unscored, and the report says so.
"""

from __future__ import annotations

import importlib
from typing import Any

from worker.evaluation.runner import DetectorFn


class DetectorConfigError(ValueError):
    """The configured detector cannot be loaded; the message names the setting and the fix."""


def load_detector(spec: str | None) -> DetectorFn | None:
    """The callable named by ``spec`` (``module:attribute``), or ``None`` for an empty spec."""
    if not spec:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DetectorConfigError(f"GenEval detector {spec!r} must be 'package.module:function' "
                                  "(ECHO4O_GENEVAL_DETECTOR or --detector)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DetectorConfigError(f"GenEval detector {spec!r}: cannot import {module_name} ({exc}); install it or "
                                  "fix ECHO4O_GENEVAL_DETECTOR") from exc
    fn: Any = getattr(module, attr, None)
    if not callable(fn):
        raise DetectorConfigError(f"GenEval detector {spec!r}: {module_name} has no callable {attr!r}")
    if not getattr(fn, "name", None):
        try:
            fn.name = spec  # named in the summary
        except (AttributeError, TypeError):
            pass
    return fn
