"""``GET /parameters``: job kinds, statuses, limits and per-mode defaults, so clients never keep a copy."""

from __future__ import annotations

from fastapi import APIRouter

from backend.schemas import JobParameters
from echo4o.jobs import parameter_spec

router = APIRouter(tags=["service"])


@router.get("/parameters", response_model=JobParameters)
def job_parameters() -> JobParameters:
    """What a job may ask for and what it gets when it leaves a field out (no key needed: these are facts
    of the API, the same for every caller)."""
    return JobParameters.model_validate(parameter_spec())
