"""Benchmark runs on the gateway side: submit a run, list runs, read a run's report files. Torch-free and free of
``worker/``: the run directory layout (``<data_dir>/benchmarks/<run id>/``: ``summary.json``, ``report.html``,
``report.md``, ``images/<prompt id>_<k>.png``) is the contract with ``worker.evaluation``."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.auth import Principal, check_submit_limits
from backend.errors import ApiError, invalid, not_found
from backend.metrics import Metrics
from backend.schemas import BenchmarkRunPublic, JobError, Progress
from backend.services.jobs import _submit_lock, resolve_model_version
from echo4o import queue
from echo4o.db import crud
from echo4o.db.models import Job
from echo4o.jobs import ACTIVE_STATUSES, BENCHMARK_RUN_PRIORITY, BenchmarkJob
from echo4o.logging import get_logger
from echo4o.settings import Settings

log = get_logger(__name__)

RUNS_DIR = "benchmarks"
REPORT_FILES = {"html": "report.html", "md": "report.md", "json": "summary.json"}
#: A run's image names: ``<prompt id>_<k>.png`` (prompt ids are letters, digits, ``-``, ``_``).
IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}_\d{1,3}\.png$")
_IMG_SRC_RE = re.compile(r"src='(images/[A-Za-z0-9_-]+\.png)'")


def run_dir(settings: Settings, run_id: str) -> Path:
    return settings.data_dir / RUNS_DIR / run_id


def submit_benchmark(session: Session, settings: Settings, metrics: Metrics, principal: Principal,
                     payload: BenchmarkJob) -> Job:
    """Check the prompt file, the model version and ``compare_to`` (422 naming the field), write the run's row,
    enqueue it (503 when the broker does not answer)."""
    if payload.prompts is not None:
        path = (settings.data_dir / payload.prompts).resolve()
        if not path.is_relative_to(settings.data_dir.resolve()) or not path.is_file():
            raise invalid("prompts", f"prompts: no prompt file {payload.prompts!r} in the data dir "
                                     f"({settings.data_dir}); put the jsonl there and give its relative path")
    model_version = resolve_model_version(session, settings, payload.model_version, param="model_version")
    if payload.compare_to is not None:
        other = crud.get_job(session=session, job_id=payload.compare_to)
        if other is None or other.kind != "benchmark":
            raise invalid("compare_to", f"compare_to: {payload.compare_to!r} is not a benchmark run "
                                        "(GET /admin/benchmarks lists them)", code="not_found")
    with _submit_lock(settings):
        check_submit_limits(session, settings, principal)
        job = crud.create_job(session=session, kind="benchmark", params=payload.model_dump(mode="json"),
                              model_version=model_version, owner=principal.owner, priority=BENCHMARK_RUN_PRIORITY)
    try:
        queue.submit(job.id, job.kind, job.priority)
    except queue.BrokerUnavailable as exc:
        crud.mark_failed(session=session, job_id=job.id, code="broker_unavailable", message=str(exc))
        raise ApiError(503, str(exc), code="broker_unavailable") from None
    metrics.jobs_submitted.labels(kind=job.kind).inc()
    log.info("benchmark submitted", extra={"job_id": job.id, "suite": payload.suite, "limit": payload.limit})
    return job


def cancel_image_jobs(session: Session, run_id: str) -> int:
    """Cancel the run's active image jobs (a queued one never runs, a running one stops at its next step);
    returns how many were active."""
    active = session.scalars(sa.select(Job.id).where(Job.parent_id == run_id,
                                                     Job.status.in_(ACTIVE_STATUSES))).all()
    for child_id in active:
        child = crud.request_cancel(session=session, job_id=child_id)
        if child is not None and child.status == "cancelled":
            queue.revoke(child_id)
    return len(active)


def list_runs(session: Session, *, limit: int, offset: int) -> tuple[list[Job], int]:
    """Benchmark runs, newest first, and how many there are."""
    cond = Job.kind == "benchmark"
    count = session.scalar(sa.select(sa.func.count()).select_from(Job).where(cond)) or 0
    rows = session.scalars(sa.select(Job).where(cond).order_by(Job.created_at.desc(), Job.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), count


def load_run(session: Session, run_id: str) -> Job:
    """The run's row, or 404 naming ``run_id``."""
    job = crud.get_job(session=session, job_id=run_id)
    if job is None or job.kind != "benchmark":
        raise not_found("benchmark run", run_id, param="run_id")
    return job


def image_job_counts(session: Session, run_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per run, its image jobs by status (one query)."""
    counts: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
    if run_ids:
        rows = session.execute(sa.select(Job.parent_id, Job.status, sa.func.count()).where(Job.parent_id.in_(run_ids))
                               .group_by(Job.parent_id, Job.status)).all()
        for parent_id, status, n in rows:
            counts[parent_id][status] = n
    return counts


def public_run(job: Job, base: str, image_jobs: dict[str, int] | None = None) -> BenchmarkRunPublic:
    params = job.params or {}
    result = job.result if job.status == "succeeded" else None
    return BenchmarkRunPublic(
        id=job.id, status=job.status, suite=params.get("suite", "?"), limit=params.get("limit"),  # type: ignore[arg-type]
        model_version=job.model_version, judge_model=params.get("judge_model"), compare_to=params.get("compare_to"),
        progress=Progress(stage=job.progress_stage, step=job.progress_step, total=job.progress_total,
                          detail=job.progress_detail),
        overall=(result or {}).get("overall"), metric=(result or {}).get("metric"),
        error=JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
        report_url=f"{base}/admin/benchmarks/{job.id}/report" if result else None,
        created_at=job.created_at, finished_at=job.finished_at, image_jobs=image_jobs or {},
    )


def report_file(settings: Settings, job: Job, fmt: str) -> Path:
    """The run's report in ``fmt``; 409 while the run has not succeeded, 404 when the file is gone."""
    if job.status != "succeeded":
        raise ApiError(409, f"benchmark run {job.id!r} is {job.status}; its report exists once it succeeded "
                            f"(GET /jobs/{job.id} shows its progress)", code="report_not_ready", param="run_id")
    path = run_dir(settings, job.id) / REPORT_FILES[fmt]
    if not path.is_file():
        raise ApiError(404, f"the report of run {job.id!r} is missing from {path.parent}", code="not_found",
                       param="run_id")
    return path


def inline_images(settings: Settings, run_id: str, html: str) -> str:
    """``html`` with the run's images embedded as data URIs (a report that shows without further requests)."""
    root = run_dir(settings, run_id)

    def embed(m: re.Match[str]) -> str:
        path = root / m.group(1)
        if not path.is_file():
            return m.group(0)
        return "src='data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii") + "'"

    return _IMG_SRC_RE.sub(embed, html)


def image_file(settings: Settings, job: Job, name: str) -> Path:
    """Image ``name`` of the run: 422 for a name that is not ``<prompt id>_<k>.png``, 404 when absent."""
    if not IMAGE_NAME_RE.match(name):
        raise invalid("name", f"name: {name!r} is not an image of a run (<prompt id>_<k>.png)")
    root = (run_dir(settings, job.id) / "images").resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        raise not_found("image", name, param="name")
    return path


def read_summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
