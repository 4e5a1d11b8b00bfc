"""A job's Server-Sent Events (``GET /jobs/{id}/events``), read from its row every ``POLL_S``."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.orm import Session

from backend.schemas import JobPublic
from backend.services.blocking import in_session
from backend.services.views import public_job
from backend.services.waiting import POLL_S
from echo4o.db import crud
from echo4o.db.models import Job
from echo4o.jobs import TERMINAL_STATUSES
from echo4o.settings import Settings


class StepCounter:
    """Which step numbers the stream has not reported yet, from one row read to the next.

    A new phase of a running job that counts anew (a benchmark's judging after its generating: the step went back
    or the total changed) reports its steps from 1 again; a phase that goes on counting (an image job's encoding
    after its last sampling step) repeats none.
    """

    def __init__(self) -> None:
        self.step = 0
        self.stage: str | None = None
        self.total: int | None = None

    def advance(self, status: str, stage: str | None, step: int, total: int | None) -> range:
        if status == "running":
            if stage != self.stage and self.stage is not None and (step < self.step or total != self.total):
                self.step = 0
            self.stage, self.total = stage, total
        if status not in ("running", "succeeded") or not total or step <= self.step:
            return range(0)
        new, self.step = range(self.step + 1, step + 1), step
        return new


async def job_events(settings: Settings, job_id: str, base: str) -> AsyncIterator[dict[str, str]]:
    """Server-Sent Events for one job, read from its row every POLL_S.

    ``queued`` when the queue position changes; ``progress`` once for every step, with its stage (when several
    steps ended between two reads, each is reported, the preview and the job's progress detail going with the
    newest; a new stage counts from 1 again); then ``done`` (the job),
    ``failed`` or ``cancelled``, and the stream ends.
    """
    last_position: int | None = -1
    counter = StepCounter()
    last_preview: bytes | None = None
    while True:
        def read(s: Session) -> tuple[Job | None, int | None, JobPublic | None]:
            job = crud.get_job(session=s, job_id=job_id)
            if job is None:
                return None, None, None
            pos = crud.queue_position(session=s, job_id=job_id) if job.status == "queued" else None
            view = public_job(s, job, base) if job.status in TERMINAL_STATUSES else None
            return job, pos, view

        job, position, view = await in_session(settings, read)
        if job is None:
            yield {"event": "failed", "data": json.dumps({"code": "not_found", "message": "the job was deleted"})}
            return
        if job.status == "queued" and position != last_position:
            last_position = position
            yield {"event": "queued", "data": json.dumps({"position": (position or 0) + 1})}
        step, total = job.progress_step or 0, job.progress_total
        for s in counter.advance(job.status, job.progress_stage, step, total):
            data: dict[str, Any] = {"step": s, "total": total, "stage": job.progress_stage}
            if s == step and job.progress_detail:
                data["detail"] = job.progress_detail
            if s == step and job.preview and job.preview != last_preview:
                data["preview"] = base64.b64encode(job.preview).decode("ascii")
                last_preview = job.preview
            yield {"event": "progress", "data": json.dumps(data)}
        if job.status == "succeeded":
            assert view is not None
            yield {"event": "done", "data": view.model_dump_json()}
            return
        if job.status == "failed":
            yield {"event": "failed", "data": json.dumps({"code": job.error_code, "message": job.error_message})}
            return
        if job.status == "cancelled":
            yield {"event": "cancelled", "data": json.dumps({"id": job.id})}
            return
        await asyncio.sleep(POLL_S)
