"""``POST /generate``: text-to-image jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from backend.api.deps import CurrentKey, MetricsDep, SettingsDep
from backend.schemas import JobCreated, JobPublic, error_responses
from backend.services.blocking import in_session
from backend.services.jobs import submit_job
from backend.services.waiting import check_wait, created_or_finished
from echo4o.jobs import GenerateJob

router = APIRouter(tags=["jobs"])

WaitQuery = Annotated[
    float | None,
    Query(ge=0, allow_inf_nan=False, description="Answer with the finished job (200) if it ends within this "
                                                 "many seconds (at most ECHO4O_WAIT_MAX_S); else 202 as usual."),
]


@router.post(
    "/generate",
    status_code=202,
    response_model=JobCreated | JobPublic,
    responses={200: {"model": JobPublic, "description": "Finished within ?wait"}, **error_responses(401, 422, 429)},
)
async def generate(
    payload: GenerateJob, request: Request, response: Response, settings: SettingsDep, principal: CurrentKey,
    metrics: MetricsDep, wait: WaitQuery = None,
) -> JobCreated | JobPublic:
    """Queue a text-to-image job. Every field is optional but `prompt`; the seed is drawn when absent."""
    timeout = check_wait(settings, wait)
    job = await in_session(settings, lambda s: submit_job(s, settings, metrics, principal, payload))
    return await created_or_finished(request, response, settings, job, timeout)
