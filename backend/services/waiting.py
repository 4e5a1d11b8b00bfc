"""``?wait``: hold a submit's answer until the job has ended (200 with the job) or the wait ran out (202)."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import Response

from backend.errors import invalid
from backend.schemas import JobCreated, JobPublic
from backend.services.blocking import in_session
from backend.services.views import base_url, created, public_job
from backend.services.watch_hub import WatchHub, hub_for
from echo4o.db.models import Job
from echo4o.settings import Settings


def check_wait(settings: Settings, wait: float | None) -> float:
    """The ``?wait`` seconds (0 when absent); 422 naming ``wait`` above ``ECHO4O_WAIT_MAX_S``."""
    if wait is None:
        return 0.0
    if wait > settings.wait_max_s:
        raise invalid("wait", f"wait: at most {settings.wait_max_s:g} seconds (ECHO4O_WAIT_MAX_S), got {wait:g}")
    return wait


async def wait_for_end(settings: Settings, job_id: str, timeout_s: float, *, hub: WatchHub | None = None) -> Job | None:
    """Wait until the job has ended or ``timeout_s`` passed; the ended job, or None (also when the row is gone).

    The wait is a watch of the process's :class:`~backend.services.watch_hub.WatchHub`: it wakes when the job's
    state changes (not for its progress), and reads nothing itself."""
    hub = hub or hub_for(settings)
    with anyio.move_on_after(timeout_s):
        async with hub.watch(job_id, progress=False) as watch:
            async for snap in watch:
                if snap.ended:
                    return snap.job
    return None


async def created_or_finished(
    request: Request, response: Response, settings: Settings, job: Job, timeout_s: float, *, webhook: bool = True
) -> JobCreated | JobPublic:
    """202 with the job's links, or, when ``?wait`` was given and the job ended in time, 200 with the job.
    ``webhook=False``: the submit asked for no webhook, so the ended job's view reads nothing and is built here,
    without a thread hop."""
    base = base_url(settings, str(request.base_url))
    if timeout_s > 0:
        ended = await wait_for_end(settings, job.id, timeout_s)
        if ended is not None:
            response.status_code = 200
            if not webhook:
                return public_job(None, ended, base, webhook=False)
            return await in_session(settings, lambda s: public_job(s, ended, base))
    return created(job, base)
