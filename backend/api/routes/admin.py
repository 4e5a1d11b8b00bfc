"""``/admin``: workers and the queue, for admin keys."""

from __future__ import annotations

from fastapi import APIRouter, Request

from backend.api.deps import AdminKey, SessionDep, SettingsDep
from backend.schemas import QueuePublic, WorkerPublic, WorkersPublic, error_responses
from backend.services.views import base_url, public_job
from echo4o.db import crud

router = APIRouter(prefix="/admin", tags=["admin"])

QUEUE_LIMIT = 200


@router.get("/workers", response_model=WorkersPublic, responses=error_responses(401, 403))
def list_workers(session: SessionDep, principal: AdminKey) -> WorkersPublic:
    """Every worker that has registered, with its status and last heartbeat."""
    rows = crud.list_workers(session=session)
    data = [WorkerPublic.model_validate(w, from_attributes=True) for w in rows]
    return WorkersPublic(data=data, count=len(data))


@router.get("/queue", response_model=QueuePublic, responses=error_responses(401, 403))
def show_queue(request: Request, session: SessionDep, settings: SettingsDep, principal: AdminKey) -> QueuePublic:
    """Running jobs, then queued jobs in the order they will run (at most 200 of each)."""
    base = base_url(settings, str(request.base_url))
    running, n_running = crud.list_jobs(session=session, status="running", limit=QUEUE_LIMIT)
    queued, n_queued = crud.list_jobs(session=session, status="queued", limit=QUEUE_LIMIT)
    views = [public_job(session, j, base) for j in [*running, *queued]]
    views.sort(key=lambda v: (v.status != "running", v.queue_position or 0))
    return QueuePublic(queued=n_queued, running=n_running, data=views)
