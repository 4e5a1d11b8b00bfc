"""Echo-4o / BAGEL inference engine: a library (no Celery, no FastAPI).

``from worker.engine import Echo4oPipeline`` (imported on first use: importing the package stays cheap).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from echo4o.logging import quiet_library_noise

# diffusers and peft import bitsandbytes at their own import when it is installed (about 5 s of CPU in every
# process) for quantizers the engine never uses. Hide it from that probing; the memory modes import it when
# asked for (worker.engine.memory.import_bitsandbytes).
sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]

# Library warnings that mean nothing to the user, among them xformers' false "won't be available" (diffusers
# imports xformers at its own import): filtered before any of them is imported.
quiet_library_noise()

if TYPE_CHECKING:
    from worker.engine.pipeline import Echo4oPipeline, Echo4oPipelineOutput, GenerationParams

__all__ = ["Echo4oPipeline", "Echo4oPipelineOutput", "GenerationParams"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker.engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
