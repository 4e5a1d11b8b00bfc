"""``POST /generate``: text-to-image jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from backend.api.deps import CurrentKey, SettingsDep
from backend.schemas import JobCreated, JobPublic, error_responses
from backend.services.jobs import Submission, submit_batched
from backend.services.views import base_url, created
from backend.services.waiting import check_wait, created_or_finished
from echo4o.db.models import new_id
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
    responses={200: {"model": JobPublic, "description": "Finished within ?wait"},
               **error_responses(401, 422, 429, 503)},
)
async def generate(
    payload: GenerateJob, request: Request, response: Response, settings: SettingsDep, principal: CurrentKey,
    wait: WaitQuery = None,
) -> JobCreated | JobPublic:
    """Queue a text-to-image job. Every field is optional but `prompt`; the seed is drawn when absent."""
    timeout = check_wait(settings, wait)
    job = await submit_batched(request.app, Submission(principal, payload, new_id()))
    if not timeout:  # the usual answer, serialised directly (the response model's union costs more than the rest)
        body = created(job, base_url(settings, str(request.base_url))).model_dump(mode="json")
        return JSONResponse(body, status_code=202)  # type: ignore[return-value]
    return await created_or_finished(request, response, settings, job, timeout)
