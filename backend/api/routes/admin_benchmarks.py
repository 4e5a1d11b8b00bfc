"""``/admin/benchmarks``: start benchmark runs, list them, read their reports and images (admin keys only).

A run is a ``benchmark`` job: ``GET /jobs/{id}`` and ``GET /jobs/{id}/events`` show its progress (stage
``generate``: step = images made of total, then ``judge``: step = verdicts; ``detail`` has the counts),
``DELETE /jobs/{id}`` cancels it with its image jobs. See docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response

from backend.api.deps import AdminKey, MetricsDep, SessionDep, SettingsDep
from backend.schemas import BenchmarkOptions, BenchmarkRunPublic, BenchmarkRunsPublic, JobCreated, error_responses
from backend.services import benchmarks, webhooks
from backend.services.blocking import in_session
from backend.services.jobs import served_versions
from backend.services.views import base_url, created
from echo4o.jobs import BENCHMARK_SUITES, MAX_BENCHMARK_IMAGES_PER_PROMPT, MAX_BENCHMARK_LIMIT, BenchmarkJob

router = APIRouter(prefix="/admin/benchmarks", tags=["admin"])


@router.post("", status_code=202, response_model=JobCreated, responses=error_responses(401, 403, 422, 429, 503))
async def start_benchmark(payload: BenchmarkJob, request: Request, settings: SettingsDep, principal: AdminKey,
                          metrics: MetricsDep) -> JobCreated:
    """Start a benchmark run: the suite's prompts (first `limit` per group) become image jobs on the gpu queue,
    then a judge scores them. Generation fields left out take the paper's settings."""
    webhook_url = await webhooks.checked(settings, payload.webhook_url)
    job = await in_session(settings, lambda s: benchmarks.submit_benchmark(s, settings, metrics, principal, payload))
    await webhooks.attach(settings, job, webhook_url)
    return created(job, base_url(settings, str(request.base_url)))


@router.get("", response_model=BenchmarkRunsPublic, responses=error_responses(401, 403))
def list_benchmarks(request: Request, session: SessionDep, settings: SettingsDep, principal: AdminKey,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50,
                    offset: Annotated[int, Query(ge=0)] = 0) -> BenchmarkRunsPublic:
    """Benchmark runs, newest first, with status, progress and overall score."""
    rows, count = benchmarks.list_runs(session, limit=limit, offset=offset)
    base = base_url(settings, str(request.base_url))
    counts = benchmarks.image_job_counts(session, [j.id for j in rows])
    return BenchmarkRunsPublic(data=[benchmarks.public_run(j, base, counts[j.id]) for j in rows], count=count)


@router.get("/options", response_model=BenchmarkOptions, responses=error_responses(401, 403))
def benchmark_options(session: SessionDep, settings: SettingsDep, principal: AdminKey) -> BenchmarkOptions:
    """What a benchmark form offers: the suites, the served model versions, the configured judge."""
    return BenchmarkOptions(suites=list(BENCHMARK_SUITES), model_versions=served_versions(session, settings),
                            judge_url=settings.judge_url or None, judge_model=settings.judge_model,
                            limit_max=MAX_BENCHMARK_LIMIT, images_per_prompt_max=MAX_BENCHMARK_IMAGES_PER_PROMPT)


@router.get("/{run_id}", response_model=BenchmarkRunPublic, responses=error_responses(401, 403, 404))
def get_benchmark(run_id: str, request: Request, session: SessionDep, settings: SettingsDep,
                  principal: AdminKey) -> BenchmarkRunPublic:
    """One run: status, progress, its image jobs by status (live) and overall score."""
    job = benchmarks.load_run(session, run_id)
    counts = benchmarks.image_job_counts(session, [job.id])[job.id]
    return benchmarks.public_run(job, base_url(settings, str(request.base_url)), counts)


@router.get("/{run_id}/report", response_class=Response,  # errors are JSON: not documented as text/html
            responses={200: {"content": {"text/html": {}, "text/markdown": {}, "application/json": {}}},
                       **error_responses(401, 403, 404, 409)})
def get_report(run_id: str, session: SessionDep, settings: SettingsDep, principal: AdminKey,
               format: Annotated[Literal["html", "md", "json"], Query(description="html (default), md, or json "  # noqa: A002
                                                                             "(the summary)")] = "html",
               inline: Annotated[bool, Query(description="html: embed the images (a self-contained page)")] = False,
               ) -> Response:
    """The run's report (409 until it succeeded). Its images are relative links to `images/<name>`."""
    path = benchmarks.report_file(settings, benchmarks.load_run(session, run_id), format)
    if format == "json":
        return JSONResponse(benchmarks.read_summary(path))
    text = path.read_text(encoding="utf-8")
    if format == "md":
        return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
    return HTMLResponse(benchmarks.inline_images(settings, run_id, text) if inline else text)


@router.get("/{run_id}/images/{name}", response_class=FileResponse, responses=error_responses(401, 403, 404, 422))
def get_image(run_id: str, name: str, session: SessionDep, settings: SettingsDep, principal: AdminKey) -> Response:
    """One image of the run (`<prompt id>_<k>.png`, as the report names it)."""
    path = benchmarks.image_file(settings, benchmarks.load_run(session, run_id), name)
    return FileResponse(path, media_type="image/png")
