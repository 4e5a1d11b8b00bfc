"""``/jobs``: read, list and cancel jobs; a user key sees its own, an admin key every key's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from backend.api.deps import CurrentKey, SessionDep, SettingsDep
from backend.auth import require_admin
from backend.schemas import JobPublic, JobsPublic, JobStatus, error_responses
from backend.services.benchmarks import cancel_image_jobs
from backend.services.views import base_url, load_job, public_job
from echo4o import queue
from echo4o.db import crud

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="The id from the submit answer.")]


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 403, 404))
def get_job(job_id: JobId, request: Request, session: SessionDep, settings: SettingsDep,
            principal: CurrentKey) -> JobPublic:
    """The job's state, progress, queue position and, once done, its image URLs."""
    job = load_job(session, principal, job_id)
    return public_job(session, job, base_url(settings, str(request.base_url)))


@router.get("", response_model=JobsPublic, responses=error_responses(401, 403, 422))
def list_jobs(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: CurrentKey,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    all: Annotated[bool, Query(description="Every key's jobs (admin keys only).")] = False,  # noqa: A002
) -> JobsPublic:
    """Your jobs, newest first."""
    if all:
        require_admin(principal)
    rows, count = crud.list_jobs(session=session, owner=None if all else principal.owner, status=status,
                                 limit=limit, offset=offset)
    base = base_url(settings, str(request.base_url))
    return JobsPublic(data=[public_job(session, j, base) for j in rows], count=count)


@router.delete("/{job_id}", response_model=JobPublic, responses=error_responses(401, 403, 404))
def cancel_job(job_id: JobId, request: Request, session: SessionDep, settings: SettingsDep,
               principal: CurrentKey) -> JobPublic:
    """Cancel: a queued job never runs; a running one stops at its next step. An ended job is left as is."""
    job = load_job(session, principal, job_id)
    if job.status == "queued":
        queue.revoke(job.id)
    job = crud.request_cancel(session=session, job_id=job.id) or job
    if job.kind == "benchmark":
        cancel_image_jobs(session, job.id)  # a benchmark run's image jobs go with it
    return public_job(session, job, base_url(settings, str(request.base_url)))
