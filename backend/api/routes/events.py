"""``GET /jobs/{id}/events``: Server-Sent Events of one job."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from backend.api.deps import CurrentKey, SettingsDep
from backend.api.routes.jobs import JobId
from backend.schemas import error_responses
from backend.services.blocking import in_session
from backend.services.events import job_events as event_stream
from backend.services.views import base_url, load_job

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`queued` {position}, `progress` {step, total, stage, detail?, preview?} "
                                    "(id: step:total:stage), then `done` (the job), `failed` {code, message} or "
                                    "`cancelled`."},
               **error_responses(401, 403, 404)},
)
async def job_events(
    job_id: JobId, request: Request, settings: SettingsDep, principal: CurrentKey
) -> EventSourceResponse:
    """Follow a job live. Every step is reported once; the stream ends with the job. Each `progress` event has
    an id: reconnect with it as `Last-Event-ID` to get the steps after it, none again."""
    await in_session(settings, lambda s: load_job(s, principal, job_id))
    base = base_url(settings, str(request.base_url))
    stream = event_stream(settings, job_id, base, last_event_id=request.headers.get("last-event-id"),
                          hub=getattr(request.app.state, "watch_hub", None), as_bytes=True)
    return EventSourceResponse(stream, ping=10)
