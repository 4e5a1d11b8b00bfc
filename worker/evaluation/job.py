"""The handler of ``benchmark`` jobs: a run whose images are ordinary image jobs on the ``gpu`` queue.

A run never holds a worker while its images wait in the queue. Each time its message is delivered it runs one
*phase*, from the state on disk and in the job rows, so any phase may be repeated or cut short by a crash:

1. read the suite (``<data_dir>/<prompts>``, or the pinned public file under ``<data_dir>/benchmarks/<suite>/``),
   keep the first ``limit`` prompts per group, resolve the generation settings (the paper's, with the job's
   overrides);
2. for every image ``<id>_<k>`` not yet in ``<data_dir>/benchmarks/<run id>/images/``: its image job has the id
   :func:`child_job_id` (derived from the run's id and the image's name, so a repeated phase finds it instead of
   making another); a missing one is created (``parent_id`` = the run, the run's owner, priority
   :data:`~echo4o.jobs.BENCHMARK_IMAGE_PRIORITY`) and enqueued; a succeeded one has its image copied into the run
   directory; a failed or cancelled one fails the run, naming the image, the job and its reason;
3. progress: stage ``generate``, step = images in the run directory, total = images of the run, detail
   ``{"generated", "images", "pending"}``;
   A phase run again after its worker died (a redelivery, or a run requeued by the next worker) enqueues its
   still-queued image jobs again, in case the dead phase wrote their rows but never sent them;
4. images still pending: the run enqueues itself again at :data:`~echo4o.jobs.BENCHMARK_RUN_PRIORITY` (the
   lowest, behind its own images) and returns, the row still ``running``; so one worker is enough;
5. every image there: :func:`worker.evaluation.runner.run_benchmark` judges (stage ``judge``, step = verdicts,
   detail ``{"generated", "images", "judged", "to_judge"}``), skipping verdicts in the run's cache, scores and
   writes ``summary.json``, ``report.md`` and ``report.html``; the job succeeds with the summary's headline as
   its result.

A cancel requested on the run cancels its active image jobs at the next phase, then the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from echo4o.db import crud, session_scope
from echo4o.db.models import Job
from echo4o.files import write_atomic
from echo4o.jobs import (
    ACTIVE_STATUSES,
    BENCHMARK_IMAGE_PRIORITY,
    BENCHMARK_RUN_PRIORITY,
    BenchmarkJob,
    describe_validation_error,
    parse_job,
)
from echo4o.logging import get_logger
from echo4o.settings import get_settings
from worker.outcomes import Claim, claim_job, fail_job, open_job

log = get_logger(__name__)

#: Where runs live, under the data dir: ``benchmarks/<run job id>/`` (the gateway reads the same layout).
RUNS_DIR = "benchmarks"
#: While every pending image of a run is running on other workers, a phase waits this long for one to finish
#: before it enqueues itself again (so several workers do not pass the run's message around in a tight loop).
WAIT_FOR_OTHERS_S = 2.0


class BenchmarkRunError(Exception):
    """The run cannot go on; ``code`` and the message go into the job row."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def run_dir(job_id: str, data_dir: Path | None = None) -> Path:
    """The run directory of benchmark job ``job_id``."""
    return Path(data_dir or get_settings().data_dir) / RUNS_DIR / job_id


def child_job_id(run_id: str, image: str) -> str:
    """The id of the image job that makes ``image`` (``<prompt id>_<k>.png``) for run ``run_id``: the same on
    every phase, so a repeated phase finds the job instead of making a second one."""
    return hashlib.sha256(f"{run_id}/{image}".encode()).hexdigest()[:32]


def execute_benchmark_job(job_id: str, *, redelivered: bool = False, row: Job | None = None) -> str:
    """Run one phase of benchmark job ``job_id`` (see the module docstring); returns its status after the phase
    (``running`` while images are pending)."""
    from worker.runtime import get_runtime

    opened = open_job(job_id, cancel=_cancel, row=row)
    if opened.outcome is not None:
        return opened.outcome
    job, payload = opened.job, opened.payload
    assert isinstance(payload, BenchmarkJob)
    # a phase cut short (its worker died) may have written image job rows it never enqueued
    recovering = redelivered or (job.status == "queued" and job.attempts > 0)
    if job.status == "queued":
        claim = claim_job(job_id, get_runtime(), cancel=_cancel)
        if not isinstance(claim, Claim):
            return claim
        log.info("benchmark started", extra={"job_id": job_id, "suite": payload.suite})
    owner, model_version = job.owner, job.model_version
    try:
        return _phase(job_id, payload, owner=owner, model_version=model_version, recovering=recovering)
    except BenchmarkRunError as exc:
        return fail_job(job_id, exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - one run's crash must not take the worker down
        log.exception("benchmark error", extra={"job_id": job_id})
        return fail_job(job_id, "benchmark_error", f"{type(exc).__name__}: {exc}")


def image_job_succeeded(run_id: str) -> None:
    """Called by the image handler when an image job of run ``run_id`` succeeded: while the run is generating,
    its step (and ``detail.generated``) becomes the number of its image jobs that succeeded, so its progress moves
    with every image, not only at its phases. Best effort: a failure here never fails the image job."""
    import sqlalchemy as sa

    from echo4o.db.models import Job

    try:
        with session_scope(get_settings().database_url) as s:
            run = crud.get_job(session=s, job_id=run_id)
            if run is None or run.status != "running" or run.progress_stage != "generate" or not run.progress_total:
                return
            total = run.progress_total
            made = s.scalar(sa.select(sa.func.count()).select_from(Job)
                            .where(Job.parent_id == run_id, Job.status == "succeeded")) or 0
            detail = {**(run.progress_detail or {}), "generated": min(made, total), "pending": max(0, total - made)}
            crud.update_progress(session=s, job_id=run_id, step=min(made, total), total=total, stage="generate",
                                 detail=detail)
    except Exception as exc:  # noqa: BLE001 - the image is made; the run's next phase counts it anyway
        log.warning("could not update the run's progress", extra={"job_id": run_id, "error": str(exc)})


def load_run(payload: BenchmarkJob, data_dir: Path) -> tuple[list[Any], Any, Any]:
    """The run's prompt records (after ``limit``), their source file and the generation settings."""
    from worker.evaluation.runner import paper_settings
    from worker.evaluation.suites import limit_per_group, load_suite

    path = None
    if payload.prompts is not None:
        path = (data_dir / payload.prompts).resolve()
        if not path.is_relative_to(data_dir.resolve()):
            raise BenchmarkRunError("invalid_params", f"prompts {payload.prompts!r} leads outside the data dir")
    try:
        records, source = load_suite(payload.suite, path, cache_dir=data_dir / RUNS_DIR)
        records = limit_per_group(records, payload.limit)
        generation = paper_settings(payload.suite, **payload.generation_overrides())
    except ValidationError as exc:
        raise BenchmarkRunError("invalid_params", describe_validation_error(exc)) from None
    except ValueError as exc:  # SuiteFileError included: names the file, the line and the fix
        raise BenchmarkRunError("prompts_unavailable", str(exc)) from None
    if not records:
        raise BenchmarkRunError("prompts_unavailable", f"the {payload.suite} prompt file has no prompts")
    return records, source, generation


def _phase(job_id: str, payload: BenchmarkJob, *, owner: str, model_version: str, recovering: bool = False) -> str:
    from worker.evaluation.runner import IMAGES_DIR, image_name

    settings = get_settings()
    data_dir = settings.data_dir
    records, source, generation = load_run(payload, data_dir)
    out = run_dir(job_id, data_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    images = [(record, k, image_name(record, k)) for record in records for k in range(generation.images_per_prompt)]
    total = len(images)
    deadline = time.monotonic() + WAIT_FOR_OTHERS_S
    while True:
        created: list[str] = []
        pending: list[str] = []
        with session_scope(settings.database_url) as s:
            for record, k, name in images:
                if (out / IMAGES_DIR / name).is_file():
                    continue
                child_id = child_job_id(job_id, name)
                child = crud.get_job(session=s, job_id=child_id)
                if child is None:
                    if _create_child(s, job_id, child_id, record, k, generation, payload, owner, model_version,
                                     data_dir):
                        created.append(child_id)
                    pending.append("queued")
                elif child.status == "succeeded":
                    write_atomic(out / IMAGES_DIR / name, (data_dir / child.result["images"][0]).read_bytes())
                elif child.status in ACTIVE_STATUSES:
                    pending.append(child.status)
                    if recovering and child.status == "queued":
                        created.append(child_id)  # enqueued again: a duplicate message finds it done and skips it
                else:
                    raise BenchmarkRunError(
                        "image_failed", f"image {name} of prompt {record.id} (job {child_id}) {child.status}: "
                        f"{child.error_code or 'cancelled'}: {child.error_message or 'its job was cancelled'}; "
                        "start a new run (finished images of this one are kept in its directory)")
            done = total - len(pending)
            cancel = crud.update_progress(session=s, job_id=job_id, step=done, total=total, stage="generate",
                                          detail={"generated": done, "images": total, "pending": len(pending)})
        if cancel:
            return _cancel(job_id)
        from echo4o.queue import submit

        for child_id in created:
            submit(child_id, "generate", BENCHMARK_IMAGE_PRIORITY)
        recovering = False
        if not pending:
            break
        if "queued" in pending or created or time.monotonic() > deadline:
            submit(job_id, "benchmark", BENCHMARK_RUN_PRIORITY)
            log.info("benchmark waits for its images", extra={"job_id": job_id, "done": done, "total": total,
                                                              "new_images": len(created)})
            return "running"
        time.sleep(0.2)  # every pending image is running on another worker: look again shortly
    return _judge(job_id, payload, records, source, generation, out, model_version)


def _create_child(s: Any, run_id: str, child_id: str, record: Any, k: int, generation: Any,
                  payload: BenchmarkJob, owner: str, model_version: str, data_dir: Path) -> bool:
    """Write the image job's row (not yet enqueued); False when a concurrent phase wrote it first."""
    references = []
    for p in record.reference_images:
        path = Path(p).resolve()
        if not path.is_relative_to(data_dir.resolve()):
            raise BenchmarkRunError("invalid_params", f"prompt {record.id}: reference image {p} is outside the data "
                                                      "dir; keep the prompt file and its images inside it")
        references.append(path.relative_to(data_dir.resolve()).as_posix())
    image_job = generation.job(record, generation.seed + k, references)
    params = {**image_job.model_dump(mode="json"), "priority": BENCHMARK_IMAGE_PRIORITY,
              "model_version": payload.model_version}
    kind = image_job.kind
    params = parse_job(kind, params).model_dump(mode="json")
    try:
        crud.create_job(session=s, kind=kind, params=params, model_version=model_version, owner=owner,
                        priority=BENCHMARK_IMAGE_PRIORITY, job_id=child_id, parent_id=run_id)
    except IntegrityError:
        s.rollback()
        return False
    return True


class _Cancelled(Exception):
    pass


def _judge(job_id: str, payload: BenchmarkJob, records: list[Any], source: Any, generation: Any, out: Path,
           model_version: str) -> str:
    from worker.evaluation.detector import DetectorConfigError, load_detector
    from worker.evaluation.judge import JudgeConfig
    from worker.evaluation.runner import run_benchmark
    from worker.progress import ProgressReporter

    settings = get_settings()
    try:
        detector = load_detector(settings.geneval_detector) if payload.suite == "geneval" else None
    except DetectorConfigError as exc:
        return fail_job(job_id, "detector_unavailable", str(exc))
    judge = None
    if payload.judge_url is not None:
        judge = JudgeConfig(base_url=payload.judge_url, model=payload.judge_model or settings.judge_model,
                            api_key=settings.judge_api_key)
    compare = None
    if payload.compare_to is not None:
        other = run_dir(payload.compare_to, settings.data_dir) / "summary.json"
        if other.is_file():
            compare = {**json.loads(other.read_text()), "label": f"run {payload.compare_to}"}
    total = len(records) * generation.images_per_prompt

    def generate(record: Any, seeds: Any) -> Any:
        raise RuntimeError(f"image of prompt {record.id} vanished from {out} before judging")

    with ProgressReporter(settings.database_url, job_id) as reporter:
        def progress(stage: str, done: int, n: int) -> None:
            if stage != "generate":
                reporter.report(done, n, stage=stage, detail={"generated": total, "images": total, "judged": done,
                                                              "to_judge": n})
            if reporter.cancelled.is_set():
                raise _Cancelled(job_id)

        try:
            summary = run_benchmark(records, out, suite=payload.suite, generate=generate, generation=generation,
                                    judge=judge, progress=progress, limit=payload.limit, suite_file=source,
                                    model={"version": model_version, "name": model_version}, compare=compare,
                                    detector=detector)
        except _Cancelled:
            summary = None
    if summary is None or reporter.cancelled.is_set():
        return _cancel(job_id)
    result = {key: summary.get(key) for key in ("suite", "overall", "overall_corrected", "metric", "groups",
                                                "counts", "notes")}
    result["report"] = f"{RUNS_DIR}/{job_id}/report.html"
    with session_scope(settings.database_url) as s:
        if not crud.mark_succeeded(session=s, job_id=job_id, result=result):
            return _cancel(job_id)
    log.info("benchmark succeeded", extra={"job_id": job_id, "overall": summary.get("overall")})
    return "succeeded"


def _cancel(job_id: str) -> str:
    """Cancel the run's active image jobs, then the run."""
    from echo4o.db.models import Job
    from echo4o.queue import revoke

    with session_scope(get_settings().database_url) as s:
        import sqlalchemy as sa

        children = s.scalars(sa.select(Job.id).where(Job.parent_id == job_id,
                                                     Job.status.in_(ACTIVE_STATUSES))).all()
        for child_id in children:
            crud.request_cancel(session=s, job_id=child_id)
            revoke(child_id)
        crud.mark_cancelled(session=s, job_id=job_id)
    log.info("benchmark cancelled", extra={"job_id": job_id, "image_jobs_cancelled": len(children)})
    return "cancelled"


