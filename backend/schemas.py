"""HTTP schemas: what the gateway answers and the requests that are not job payloads.

Job payloads themselves (prompt, size, steps, CFG, seed, ...) are defined once in :mod:`echo4o.jobs` and shared
with the worker; the routes take them as request bodies directly. Nothing here touches SQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from echo4o.jobs import JobKind, JobStatus

__all__ = ["JobKind", "JobStatus"]  # re-exported for the routes; defined in echo4o.jobs


# --- errors ------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and how to fix it.")
    type: str = Field(description="Error class, e.g. invalid_request_error, authentication_error.")
    param: str | None = Field(None, description="The field at fault as a dotted path (`height`, `images.1`).")
    code: str = Field(description="Stable machine-readable code, e.g. invalid_value, rate_limited.")


class ErrorResponse(BaseModel):
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
    id: str
    status: JobStatus
    status_url: str = Field(description="GET it for the job's state.")
    events_url: str = Field(description="Server-Sent Events: queued, progress, then done, failed or cancelled.")


class Progress(BaseModel):
    stage: str | None = None
    step: int | None = None
    total: int | None = None


class ResultImage(BaseModel):
    index: int
    url: str


class JobResult(BaseModel):
    images: list[ResultImage]
    seed: int | None = None
    timings: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    code: str | None
    message: str | None


class JobPublic(BaseModel):
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


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filter, across all pages.")


# --- service -----------------------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="broker, database, workers: `ok` or what is wrong.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    source: str = Field(description="Folder or Hugging Face Hub id the workers load.")
    workers_ready: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class WorkerPublic(BaseModel):
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
    data: list[WorkerPublic]
    count: int


class QueuePublic(BaseModel):
    queued: int
    running: int
    data: list[JobPublic] = Field(description="Queued and running jobs of every key, next to run first.")


class ParameterLimits(BaseModel):
    """Bounds a job's fields must respect (inclusive)."""

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


class JobParameters(BaseModel):
    """Job facts as the gateway applies them: kinds, statuses, limits and per-kind defaults."""

    job_kinds: list[JobKind]
    statuses: list[JobStatus]
    terminal_statuses: list[JobStatus]
    renorm_types: list[str]
    aspect_ratios: dict[str, tuple[int, int]] = Field(description="Preset name -> (height, width).")
    limits: ParameterLimits
    defaults: dict[str, ModeDefaults] = Field(description="Per image job kind (generate, multiref).")


# --- OpenAI-compatible images API --------------------------------------------------------------------------
class ImagesGenerationRequest(BaseModel):
    """OpenAI's ``POST /v1/images/generations`` body. Fields of our generate job (``num_steps``, ``seed``,
    ``cfg_text_scale``, ...) may be added (the client's ``extra_body``); unknown fields are refused."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="Served model version; empty: the default.")
    n: int = Field(1, ge=1, le=4)
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 16 up to 1024, or `auto`.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = Field(None, description="Accepted and ignored.")
    style: str | None = Field(None, description="Accepted and ignored.")
    user: str | None = Field(None, description="Accepted and ignored.")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
