"""HTTP schemas: what the gateway answers and the requests that are not job payloads.

Job payloads themselves (prompt, size, steps, CFG, seed, ...) are defined once in :mod:`echo4o.jobs` and shared
with the worker; the routes take them as request bodies directly. Nothing here touches SQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from echo4o.jobs import MAX_NUM_IMAGES, MAX_SIDE, SIDE_MULTIPLE, JobKind, JobStatus

__all__ = ["JobKind", "JobStatus"]  # re-exported for the routes; defined in echo4o.jobs


# --- errors ------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    """One error: what went wrong, the field at fault and a stable code (OpenAI's error shape)."""

    message: str = Field(description="What went wrong and how to fix it.")
    type: str = Field(description="Error class, e.g. invalid_request_error, authentication_error.")
    param: str | None = Field(None, description="The field at fault as a dotted path (`height`, `images.1`).")
    code: str = Field(description="Stable machine-readable code, e.g. invalid_value, rate_limited.")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer: ``{"error": {message, type, param, code}}``."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for the given statuses."""
    text = {
        401: "No or unknown API key",
        403: "The key may not see this",
        404: "No such resource",
        413: "Upload too large",
        415: "Unsupported image type",
        422: "Invalid field (param names it)",
        429: "Rate or queued-job limit reached (see Retry-After)",
        503: "Not ready",
    }
    return {s: {"model": ErrorResponse, "description": text.get(s, "Error")} for s in statuses}


# --- jobs --------------------------------------------------------------------------------------------------
class JobCreated(BaseModel):
    """The 202 answer to a submit (``POST /generate``, ``POST /multiref``): the job's id, status and where to
    follow it. A submit with ``?wait`` whose job ended in time answers :class:`JobPublic` (200) instead."""

    id: str
    status: JobStatus
    status_url: str = Field(description="GET it for the job's state.")
    events_url: str = Field(description="Server-Sent Events: queued, progress, then done, failed or cancelled.")


class Progress(BaseModel):
    """How far a job is: ``step`` of ``total`` in ``stage`` (``sampling``: denoising steps of an image job;
    ``paused``: its sampling waits while a job of a higher priority runs, ``detail.preempted_by`` names it); all
    null until a worker reports. ``detail`` is what a long job reports beside its step, e.g. a training run's
    loss, lr, samples_per_s and eta_s."""

    stage: str | None = None
    step: int | None = None
    total: int | None = None
    detail: dict[str, Any] | None = None


class ResultImage(BaseModel):
    """One image of a succeeded job and the URL it is served at (``GET /jobs/{id}/images/{n}``)."""

    index: int
    url: str


class JobResult(BaseModel):
    """What a succeeded job produced: its images, the seed used and the worker's timings in seconds."""

    images: list[ResultImage]
    seed: int | None = None
    timings: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] | None = Field(None, description=(
        "The rest of the worker's result: an image job's batch ({id, size}, when it was sampled with others) and "
        "pauses ([{job_id, s}], when jobs of a higher priority ran while it waited); a fine-tuning run's version, "
        "path, final_loss, steps, tensorboard dir, skipped_rows and losses ([step, loss] points)."))


class JobError(BaseModel):
    """Why a job failed: a stable code (``invalid_params``, ``broker_unavailable``, ...) and a message."""

    code: str | None
    message: str | None


class WebhookStatus(BaseModel):
    """Where a job's end is POSTed and how far that got (docs/api.md, "Webhooks")."""

    url: str
    state: Literal["waiting", "delivering", "retrying", "delivered", "failed"] = Field(
        description="waiting: the job has not ended; delivering: an attempt is under way; retrying: the last "
                    "attempt failed, another follows; delivered: a 2xx answer; failed: every attempt failed.")
    attempts: int
    last_status: int | None = Field(None, description="HTTP status of the last attempt (null: no answer).")
    last_error: str | None = None
    delivered_at: datetime | None = None


class WebhookSecretPublic(BaseModel):
    """The secret this key's webhook deliveries are signed with (``X-Echo4o-Signature``)."""

    secret: str
    created_at: datetime | None


class JobPublic(BaseModel):
    """A job as its owner (or an admin key) sees it: returned by ``GET /jobs/{id}``, ``DELETE /jobs/{id}``, in
    lists, in the SSE ``done`` event, and by a submit with ``?wait`` whose job ended in time (200)."""

    id: str
    kind: JobKind
    status: JobStatus
    params: dict[str, Any]
    model_version: str | None
    progress: Progress
    queue_position: int | None = Field(None, description="1 = next to run; null unless queued.")
    result: JobResult | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    attempts: int = Field(0, description="Runs started: 1 for a job that ran once; more when a run was cut "
                                     "off (its worker died or was stopped) and the job ran again. Only the "
                                     "latest run may write the result.")
    webhook: WebhookStatus | None = Field(None, description="The job's webhook delivery, when it asked for one.")


class JobsPublic(BaseModel):
    """One page of ``GET /jobs``, newest first, with the number of all matching jobs."""

    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filter, across all pages.")


# --- service -----------------------------------------------------------------------------------------------
class Health(BaseModel):
    """``GET /healthz``: the gateway process answers (nothing else is checked)."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """``GET /readyz``: 200 and ``ready`` when broker, database and a model-loaded worker all answer; 503 and
    ``not_ready`` otherwise, each check saying what is wrong."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="broker, database, workers: `ok` or what is wrong.")


class ModelCard(BaseModel):
    """One model version jobs may name, and how many ready workers serve it."""

    id: str
    object: Literal["model"] = "model"
    source: str = Field(description="Folder or Hugging Face Hub id the workers load.")
    workers_ready: int
    current: bool = Field(False, description="The version a job that names none runs on.")


class ModelList(BaseModel):
    """``GET /models`` (OpenAI's list shape): the configured version first, then the registered ones
    (``<name>/<version>``): the versions a job may name."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class WorkerPublic(BaseModel):
    """One registered worker: its queues, model, device, status and last heartbeat (admin keys only)."""

    id: str
    hostname: str
    queues: str | None
    model_version: str | None
    device: str | None
    attention: str | None
    status: str
    started_at: datetime | None
    heartbeat_at: datetime | None


class WorkersPublic(BaseModel):
    """``GET /admin/workers``: every worker that has registered."""

    data: list[WorkerPublic]
    count: int


class QueuePublic(BaseModel):
    """``GET /admin/queue``: how many jobs of every key are queued and running, and those jobs."""

    queued: int
    running: int
    data: list[JobPublic] = Field(description="Queued and running jobs of every key, next to run first.")


class ParameterLimits(BaseModel):
    """Bounds a job's fields must respect (inclusive); a submit outside them is a 422 naming the field."""

    side_min: int
    side_max: int
    side_multiple: int = Field(description="height and width are multiples of this.")
    steps_min: int
    steps_max: int
    seed_max: int
    num_images_max: int
    scale_max: float = Field(description="Upper bound of cfg_text_scale and cfg_img_scale.")
    shift_max: float = Field(description="Upper bound of timestep_shift (which must be > 0).")
    renorm_min_max: float
    priority_max: int
    prompt_chars_max: int
    references_max: int


class ModeDefaults(BaseModel):
    """What an image job of one kind gets for each field it leaves out (null size: follow the last reference)."""

    height: int | None
    width: int | None
    num_steps: int
    timestep_shift: float
    cfg_renorm_min: float
    num_images: int
    priority: int
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str


class FinetuneParameters(BaseModel):
    """Choices and bounds of a fine-tuning job; a field it leaves out takes the trainer's default."""

    modes: list[str]
    layouts: list[str] = Field(description="Data layouts a job may name (auto: detected per file).")
    steps_max: int
    tokens_max: int = Field(description="Upper bound of expected_tokens and max_tokens.")


class JobParameters(BaseModel):
    """``GET /parameters`` (no key needed): job facts as the gateway applies them, kinds, statuses, limits and
    per-kind defaults, from :func:`echo4o.jobs.parameter_spec`, so clients never keep a copy."""

    job_kinds: list[JobKind]
    statuses: list[JobStatus]
    terminal_statuses: list[JobStatus]
    renorm_types: list[str]
    aspect_ratios: dict[str, tuple[int, int]] = Field(description="Preset name -> (height, width).")
    limits: ParameterLimits
    defaults: dict[str, ModeDefaults] = Field(description="Per image job kind (generate, multiref).")
    finetune: FinetuneParameters = Field(description="Choices and bounds of POST /admin/finetune.")


# --- OpenAI-compatible images API --------------------------------------------------------------------------
class ImagesGenerationRequest(BaseModel):
    """OpenAI's ``POST /v1/images/generations`` body. Fields of our generate job (``num_steps``, ``seed``,
    ``cfg_text_scale``, ...) may be added (the client's ``extra_body``); unknown fields are refused."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="Served model version; empty: the default.")
    n: int = Field(1, ge=1, le=MAX_NUM_IMAGES)
    size: str | None = Field(
        None, description=f"WIDTHxHEIGHT, multiples of {SIDE_MULTIPLE} up to {MAX_SIDE}, or `auto`."
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = Field(None, description="Accepted and ignored.")
    style: str | None = Field(None, description="Accepted and ignored.")
    user: str | None = Field(None, description="Accepted and ignored.")


class ImageData(BaseModel):
    """One image of an OpenAI-style answer: base64 PNG/WebP/JPEG (``b64_json``) or a URL, as requested."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """The answer of ``POST /v1/images/generations`` and ``/v1/images/edits`` (OpenAI's shape), once the job
    has succeeded; ``created`` is the job's submit time in Unix seconds."""

    created: int
    data: list[ImageData]


# --- model versions (admin) ----------------------------------------------------------------------------------
class ModelVersionPublic(BaseModel):
    """One model version jobs may name: the configured model (source ``configured``) or a registered one."""

    ref: str = Field(description="What jobs name as model_version: `<name>/<version>`, or the configured model's.")
    source: str = Field(description="configured, base, download, finetune or import.")
    path: str = Field(description="The folder (or Hub id, for the configured model) workers load.")
    manifest: dict[str, Any] | None = Field(description="Its manifest.json (base, data, steps, loss, ...).")
    created_at: datetime | None = Field(description="When it was registered (None for the configured model).")
    current: bool = Field(description="Whether a job that names no version runs on it.")


class PromotionPublic(BaseModel):
    """One promotion: who made ``ref`` current and when; a rolled-back one has ``reverted_at`` set."""

    model_config = ConfigDict(from_attributes=True)

    ref: str
    promoted_by: str
    promoted_at: datetime
    reverted_by: str | None
    reverted_at: datetime | None


class ModelVersionsPublic(BaseModel):
    """``GET /admin/models``: every version (configured first), the current one and the promotion history."""

    current: str
    configured: str
    data: list[ModelVersionPublic]
    count: int
    promotions: list[PromotionPublic] = Field(description="Newest first (at most 50).")


class CurrentModelPublic(BaseModel):
    """The answer of promote and rollback: the version new jobs get now, and the one they got before."""

    current: str
    previous: str


# --- benchmark runs (admin) --------------------------------------------------------------------------------
class BenchmarkRunPublic(BaseModel):
    """One benchmark run (a ``benchmark`` job): what it measures, how far it is and, once finished, its overall
    score and where its report is (``GET /admin/benchmarks/{id}/report``)."""

    id: str
    status: JobStatus
    suite: str
    limit: int | None
    model_version: str | None
    judge_model: str | None
    compare_to: str | None
    progress: Progress = Field(description="Stage generate (step = images in the run, as of its last phase) then "
                                           "judge (step = verdicts).")
    image_jobs: dict[str, int] = Field(default_factory=dict, description=(
        "The run's image jobs by status, live (``succeeded`` counts the images made so far)."))
    overall: float | None = Field(None, description="The suite's overall score once the run succeeded.")
    metric: str | None = None
    error: JobError | None = None
    report_url: str | None = Field(None, description="The HTML report, once the run succeeded.")
    created_at: datetime
    finished_at: datetime | None


class BenchmarkOptions(BaseModel):
    """``GET /admin/benchmarks/options``: what a benchmark form offers (suites, served model versions) and the
    gateway's judge settings (the defaults of a run that names no judge; the key is never shown)."""

    suites: list[str]
    model_versions: list[str]
    judge_url: str | None
    judge_model: str
    limit_max: int
    images_per_prompt_max: int


class BenchmarkRunsPublic(BaseModel):
    """``GET /admin/benchmarks``: runs newest first, with the number of all runs."""

    data: list[BenchmarkRunPublic]
    count: int
