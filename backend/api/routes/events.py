"""``GET /jobs/{id}/events``: Server-Sent Events of one job."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from backend import service
from backend.api.deps import CurrentKey, SettingsDep
from backend.api.routes.jobs import JobId
from backend.schemas import error_responses

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`queued` {position}, `progress` {step, total, preview?}, then `done` (the "
                                    "job), `failed` {code, message} or `cancelled`."},
               **error_responses(401, 403, 404)},
)
async def job_events(
    job_id: JobId, request: Request, settings: SettingsDep, principal: CurrentKey
) -> EventSourceResponse:
    """Follow a job live. Every step is reported once; the stream ends with the job."""
    await service.in_session(settings, lambda s: service.load_job(s, principal, job_id))
    base = service.base_url(settings, str(request.base_url))
    return EventSourceResponse(service.job_events(settings, job_id, base), ping=10)
