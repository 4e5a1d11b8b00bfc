"""``?wait``: hold a submit's answer until the job has ended (200 with the job) or the wait ran out (202)."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response

from backend.errors import invalid
from backend.schemas import JobCreated, JobPublic
from backend.services.blocking import in_session
from backend.services.views import base_url, created, public_job
from echo4o.db import crud
from echo4o.db.models import Job
from echo4o.jobs import TERMINAL_STATUSES
from echo4o.settings import Settings

POLL_S = 0.1  # how often ?wait and the event stream re-read the job row


def check_wait(settings: Settings, wait: float | None) -> float:
    """The ``?wait`` seconds (0 when absent); 422 naming ``wait`` above ``ECHO4O_WAIT_MAX_S``."""
    if wait is None:
        return 0.0
    if wait > settings.wait_max_s:
        raise invalid("wait", f"wait: at most {settings.wait_max_s:g} seconds (ECHO4O_WAIT_MAX_S), got {wait:g}")
    return wait


async def wait_for_end(settings: Settings, job_id: str, timeout_s: float) -> Job | None:
    """Poll the row until the job has ended or ``timeout_s`` passed; the ended job, or None."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = await in_session(settings, lambda s: crud.get_job(session=s, job_id=job_id))
        if job is not None and job.status in TERMINAL_STATUSES:
            return job
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


async def created_or_finished(
    request: Request, response: Response, settings: Settings, job: Job, timeout_s: float
) -> JobCreated | JobPublic:
    """202 with the job's links, or, when ``?wait`` was given and the job ended in time, 200 with the job."""
    base = base_url(settings, str(request.base_url))
    if timeout_s > 0:
        ended = await wait_for_end(settings, job.id, timeout_s)
        if ended is not None:
            response.status_code = 200
            return await in_session(settings, lambda s: public_job(s, ended, base))
    return created(job, base)
