"""``/healthz`` (the process answers), ``/readyz`` (it can run jobs) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from backend.api.deps import MetricsDep, SessionDep, SettingsDep
from backend.schemas import Health, Readiness
from echo4o import queue
from echo4o.db import crud

router = APIRouter(tags=["service"])

WORKER_FRESH_S = 30.0


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The gateway process is up (checks nothing else)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Ready when the broker and the database answer and a worker with the model loaded has a fresh heartbeat."""
    checks: dict[str, str] = {}
    try:
        queue.ping_broker(timeout_s=2.0)
        checks["broker"] = "ok"
    except queue.BrokerUnavailable as exc:
        checks["broker"] = str(exc)
    try:
        session.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
        ready = crud.list_ready_workers(session=session, max_age_s=WORKER_FRESH_S, queue="gpu")
        checks["workers"] = (
            f"ok ({len(ready)} ready)" if ready
            else "no worker with the model loaded has sent a heartbeat in the last 30 s: start `echo4o worker "
                 "--queues gpu` (or wait for it to finish loading)"
        )
    except sa.exc.SQLAlchemyError as exc:
        checks["database"] = f"cannot query the database ({type(exc).__name__}): check ECHO4O_DATABASE_URL"
        checks.setdefault("workers", "unknown (database unavailable)")
    ok = all(v.startswith("ok") for v in checks.values())
    body = Readiness(status="ready" if ok else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format: jobs by status, queue depth, step time, latency histograms."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
