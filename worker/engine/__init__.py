"""Echo-4o / BAGEL inference engine: a library (no Celery, no FastAPI).

``from worker.engine import Echo4oPipeline`` (imported on first use: importing the package stays cheap).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

# diffusers and peft import bitsandbytes at their own import when it is installed (about 5 s of CPU in every
# process) for quantizers the engine never uses. Hide it from that probing; the memory modes import it when
# asked for (worker.engine.memory.import_bitsandbytes).
sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]


class _XformersLibraryBanner(logging.Filter):
    """xformers warns at its import (which diffusers makes at its own) that its compiled library did not load and
    that memory-efficient attention "won't be available": not so in 0.0.35, whose attention does not use that
    library (worker.engine.attention, the note above XFORMERS_PAIRING, logs what is true instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "can't load C++/CUDA extensions" not in record.getMessage()


if not any(isinstance(f, _XformersLibraryBanner) for f in logging.getLogger("xformers").filters):
    logging.getLogger("xformers").addFilter(_XformersLibraryBanner())  # the logger of xformers._cpp_lib

if TYPE_CHECKING:
    from worker.engine.pipeline import Echo4oPipeline, Echo4oPipelineOutput, GenerationParams

__all__ = ["Echo4oPipeline", "Echo4oPipelineOutput", "GenerationParams"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker.engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
