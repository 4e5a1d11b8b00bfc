"""``POST /generate``: text-to-image jobs."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from backend.api.deps import SECURITY, CallerDep
from backend.schemas import JobCreated, JobPublic, error_responses
from backend.services.jobs import Submission, submit_batched
from backend.services.views import base_url
from backend.services.waiting import check_wait, created_or_finished
from echo4o.db.models import new_id
from echo4o.jobs import GenerateJob
from echo4o.settings import Settings

router = APIRouter(tags=["jobs"])

WaitQuery = Annotated[
    float | None,
    Query(ge=0, allow_inf_nan=False, description="Answer with the finished job (200) if it ends within this "
                                                 "many seconds (at most ECHO4O_WAIT_MAX_S); else 202 as usual."),
]

_BASES: dict[tuple[object, ...], str] = {}  # (public URL, scheme, server, root path, Host) -> link prefix
_BASES_MAX = 64  # Host is the client's to choose: past this many, the prefix is built each time


def _base(request: Request, settings: Settings) -> str:
    """:func:`backend.services.views.base_url` of the request, remembered per origin (building the request's
    base URL costs more than the rest of the answer)."""
    scope = request.scope
    host = next((v for k, v in scope["headers"] if k == b"host"), None)
    server = scope.get("server")
    key = (settings.public_url, scope.get("scheme"), server and tuple(server), scope.get("app_root_path"),
           scope.get("root_path"), host)
    base = _BASES.get(key)
    if base is None:
        base = base_url(settings, str(request.base_url))
        if len(_BASES) < _BASES_MAX:
            _BASES[key] = base
    return base


@router.post(
    "/generate",
    status_code=202,
    response_model=JobCreated | JobPublic,
    responses={200: {"model": JobPublic, "description": "Finished within ?wait"},
               **error_responses(401, 422, 429, 503)},
    openapi_extra=SECURITY,
)
async def generate(
    payload: GenerateJob, request: Request, response: Response, caller: CallerDep, wait: WaitQuery = None,
) -> JobCreated | JobPublic:
    """Queue a text-to-image job. Every field is optional but `prompt`; the seed is drawn when absent."""
    settings = caller.settings
    timeout = check_wait(settings, wait)
    job = await submit_batched(request.app, Submission(caller.principal, payload, new_id()))
    if not timeout:  # the usual answer, serialised directly: JobCreated's fields, as views.created fills them
        base = _base(request, settings)
        body = {"id": job.id, "status": job.status, "status_url": f"{base}/jobs/{job.id}",
                "events_url": f"{base}/jobs/{job.id}/events"}
        return Response(json.dumps(body, separators=(",", ":")).encode(), status_code=202,  # type: ignore[return-value]
                        media_type="application/json")
    return await created_or_finished(request, response, settings, job, timeout, webhook=payload.webhook_url is not None)
