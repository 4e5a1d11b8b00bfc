"""How a job handler ends a job badly, written once for the image, fine-tuning and benchmark handlers: the payload
check every handler starts with, the failed row, and the device memory a failed run gives back.

Torch-free at import time.
"""

from __future__ import annotations

import gc
from typing import Any

from pydantic import ValidationError

from echo4o.db import crud, session_scope
from echo4o.jobs import describe_validation_error, parse_job
from echo4o.logging import get_logger
from echo4o.settings import get_settings

log = get_logger(__name__)


def fail_job(job_id: str, code: str, message: str) -> str:
    """Mark the job failed with ``code`` and ``message`` (the worker takes the next job); returns ``"failed"``."""
    with session_scope(get_settings().database_url) as s:
        crud.mark_failed(session=s, job_id=job_id, code=code, message=message)
    log.warning("job failed", extra={"job_id": job_id, "code": code, "error": message})
    return "failed"


def payload_problem(kind: str, params: dict[str, Any]) -> tuple[Any, str | None]:
    """``(payload, None)`` for valid stored params, or ``(None, message)`` naming each bad field (the worker's
    re-validation of what the gateway accepted)."""
    try:
        return parse_job(kind, params), None
    except ValidationError as exc:
        return None, describe_validation_error(exc)
    except ValueError as exc:
        return None, str(exc)


def free_device_memory() -> None:
    """Give the CUDA cache back after a run that failed or ended (objects that refer to each other are collected
    first); nothing on the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
