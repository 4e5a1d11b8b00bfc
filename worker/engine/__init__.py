"""Echo-4o / BAGEL inference engine: a library (no Celery, no FastAPI).

``from worker.engine import Echo4oPipeline`` (imported on first use: importing the package stays cheap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.engine.pipeline import Echo4oPipeline, Echo4oPipelineOutput, GenerationParams

__all__ = ["Echo4oPipeline", "Echo4oPipelineOutput", "GenerationParams"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker.engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
