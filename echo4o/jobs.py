"""Job payloads shared by the gateway (validation on submit) and the worker (re-validation before running).

Torch-free: importing this module costs pydantic only. Every field is bounded; limits that are settings
(prompt length, number of references) are read from :func:`echo4o.settings.get_settings` at validation time,
so the gateway and the worker each apply their own configuration.

A payload is stored, as ``model_dump(mode="json")``, in the job row's ``params``; the seed is drawn on
submission when the client gave none, so the stored params always say which seed was used.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from echo4o.settings import get_settings

# ------------------------------------------------------------------------------------------------------------
# Job facts. Each is defined here once; the records layer, the gateway, the worker, the engine, the CLI and
# (through ``GET /parameters``) the UI read them from here.
# ------------------------------------------------------------------------------------------------------------
JobKind = Literal["generate", "multiref", "finetune", "benchmark"]
JOB_KINDS: tuple[str, ...] = get_args(JobKind)
#: Kinds that produce images and carry an ``_ImageJob`` payload.
IMAGE_KINDS: tuple[str, ...] = ("generate", "multiref")
#: Which Celery queue each job kind runs on; queue positions are counted within one queue.
QUEUE_OF_KIND: dict[str, str] = {"generate": "gpu", "multiref": "gpu", "benchmark": "gpu", "finetune": "train"}

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
ACTIVE_STATUSES: tuple[str, ...] = ("queued", "running")
TERMINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled")

RenormType = Literal["global", "channel", "text_channel"]
RENORM_TYPES: tuple[str, ...] = get_args(RenormType)

#: Aspect-ratio presets as (height, width) in pixels.
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (768, 1024),
    "3:4": (1024, 768),
    "16:9": (576, 1024),
    "9:16": (1024, 576),
}
AspectRatio = Literal["1:1", "4:3", "3:4", "16:9", "9:16"]

# Limits of one job.
SEED_MAX = 2**32 - 1
SIDE_MULTIPLE = 16  # one latent token covers 16x16 pixels
MIN_SIDE = SIDE_MULTIPLE
MAX_SIDE = 1024  # the latent position embedding covers 64x64 tokens
MIN_STEPS = 2  # schedule points: num_steps - 1 denoising steps, so 2 is the fewest that denoise at all
MAX_STEPS = 100
MAX_NUM_IMAGES = 4
MAX_SCALE = 30.0
MAX_SHIFT = 20.0
MAX_RENORM_MIN = 1.0
MAX_PRIORITY = 9

# Defaults shared by both image modes.
DEFAULT_SIZE: tuple[int, int] = (1024, 1024)  # (height, width) of text-to-image; multiref follows its reference
DEFAULT_STEPS = 50
DEFAULT_TIMESTEP_SHIFT = 3.0
DEFAULT_RENORM_MIN = 0.0
DEFAULT_PRIORITY = 5


@dataclass(frozen=True)
class GuidanceDefaults:
    """The guidance a mode uses when a job leaves it out (the reference inferencer's settings)."""

    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str


#: Per image kind: text-to-image, and multi-reference (references + instruction).
MODE_DEFAULTS: dict[str, GuidanceDefaults] = {
    "generate": GuidanceDefaults(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
                                 cfg_renorm_type="global"),
    "multiref": GuidanceDefaults(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                                 cfg_renorm_type="text_channel"),
}


def parameter_spec() -> dict[str, Any]:
    """Every job fact a client needs to build a form, as JSON (served by ``GET /parameters``)."""
    settings = get_settings()
    return {
        "job_kinds": list(JOB_KINDS),
        "statuses": list(JOB_STATUSES),
        "terminal_statuses": list(TERMINAL_STATUSES),
        "renorm_types": list(RENORM_TYPES),
        "aspect_ratios": {name: list(hw) for name, hw in ASPECT_PRESETS.items()},
        "limits": {
            "side_min": MIN_SIDE, "side_max": MAX_SIDE, "side_multiple": SIDE_MULTIPLE,
            "steps_min": MIN_STEPS, "steps_max": MAX_STEPS, "seed_max": SEED_MAX,
            "num_images_max": MAX_NUM_IMAGES, "scale_max": MAX_SCALE, "shift_max": MAX_SHIFT,
            "renorm_min_max": MAX_RENORM_MIN, "priority_max": MAX_PRIORITY,
            "prompt_chars_max": settings.max_prompt_chars, "references_max": settings.max_references,
        },
        "defaults": {
            kind: {
                "height": DEFAULT_SIZE[0] if kind == "generate" else None,
                "width": DEFAULT_SIZE[1] if kind == "generate" else None,
                "num_steps": DEFAULT_STEPS, "timestep_shift": DEFAULT_TIMESTEP_SHIFT,
                "cfg_renorm_min": DEFAULT_RENORM_MIN, "num_images": 1, "priority": DEFAULT_PRIORITY,
                "cfg_text_scale": g.cfg_text_scale, "cfg_img_scale": g.cfg_img_scale,
                "cfg_interval": list(g.cfg_interval), "cfg_renorm_type": g.cfg_renorm_type,
            }
            for kind, g in MODE_DEFAULTS.items()
        },
        "finetune": {
            "modes": list(FINETUNE_MODES), "layouts": list(FINETUNE_LAYOUTS), "steps_max": MAX_TRAIN_STEPS,
            "tokens_max": MAX_TRAIN_TOKENS,
        },
    }


def draw_seed() -> int:
    """A fresh seed in [0, 2**32 - 1], drawn from the OS's randomness."""
    return secrets.randbelow(SEED_MAX + 1)


WEBHOOK_URL_MAX_CHARS = 2048


def check_webhook_url_syntax(v: str | None) -> str | None:
    """An absolute http(s) URL with a host and no credentials (where it resolves is the gateway's check)."""
    if v is None:
        return None
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook_url must be an absolute http:// or https:// URL, got {v!r}")
    if parts.username or parts.password:
        raise ValueError("webhook_url must not carry credentials (user:password@); deliveries are signed instead")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"webhook_url: {exc}") from None
    if any(c.isspace() or ord(c) < 32 for c in v):
        raise ValueError("webhook_url must not contain whitespace or control characters")
    return v


class _Webhook(BaseModel):
    """``webhook_url`` of every job kind. Not a job parameter: kept out of ``model_dump`` (so out of the row's
    params and the worker's payload); the gateway stores it in the job's webhook delivery (docs/api.md,
    "Webhooks")."""

    webhook_url: str | None = Field(
        None, max_length=WEBHOOK_URL_MAX_CHARS, exclude=True,
        description="http(s) URL the job's JSON is POSTed to, signed, once the job ends.",
    )

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, v: str | None) -> str | None:
        return check_webhook_url_syntax(v)


class _ImageJob(_Webhook):
    """Fields common to every image-producing job. ``None`` means "the mode's default" (see the engine)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=False)

    kind: ClassVar[str]

    prompt: str = Field(..., min_length=1, description="What to draw (or the edit instruction).")
    height: int | None = Field(
        None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE, description="Output height in pixels."
    )
    width: int | None = Field(
        None,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=SIDE_MULTIPLE,
        validate_default=True,
        description="Output width in pixels.",
    )
    aspect_ratio: AspectRatio | None = Field(
        None, description="A preset size instead of height/width (see ASPECT_PRESETS)."
    )
    num_steps: int = Field(
        DEFAULT_STEPS,
        ge=MIN_STEPS,
        le=MAX_STEPS,
        description="Schedule points, as the reference counts them: num_steps - 1 denoising steps.",
    )
    cfg_text_scale: float | None = Field(None, ge=0.0, le=MAX_SCALE, description="Text guidance scale.")
    cfg_img_scale: float | None = Field(None, ge=0.0, le=MAX_SCALE, description="Image guidance scale.")
    cfg_interval: tuple[float, float] | None = Field(
        None, description="[low, high] in [0, 1]: guidance applies while the timestep is in it."
    )
    timestep_shift: float = Field(
        DEFAULT_TIMESTEP_SHIFT, gt=0.0, le=MAX_SHIFT, description="Timestep shift of the schedule."
    )
    cfg_renorm_type: RenormType | None = Field(None, description="Guidance renormalisation.")
    cfg_renorm_min: float = Field(
        DEFAULT_RENORM_MIN, ge=0.0, le=MAX_RENORM_MIN, description="Floor of the renormalisation factor."
    )
    seed: int = Field(
        default_factory=draw_seed, ge=0, le=SEED_MAX, description="Random seed; drawn and recorded when absent."
    )
    num_images: int = Field(
        1, ge=1, le=MAX_NUM_IMAGES, description="Images to draw from this seed, one after another."
    )
    priority: int = Field(
        DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY, description="Queue priority: 9 runs first, 0 last."
    )
    model_version: str | None = Field(
        None, min_length=1, max_length=200, description="Served model version to use; None: the worker's."
    )
    @field_validator("seed", mode="before")
    @classmethod
    def _draw_missing_seed(cls, v: object) -> object:
        return draw_seed() if v is None else v

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must contain text, not only whitespace")
        if "\x00" in v:
            raise ValueError("prompt must not contain NUL characters")
        limit = get_settings().max_prompt_chars
        if len(v) > limit:
            raise ValueError(f"prompt is {len(v)} characters; at most {limit} are allowed (ECHO4O_MAX_PROMPT_CHARS)")
        return v

    @field_validator("cfg_interval")
    @classmethod
    def _check_interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is None:
            return v
        low, high = v
        if not (math.isfinite(low) and math.isfinite(high)) or not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
            raise ValueError(f"cfg_interval values must lie in [0, 1], got {list(v)}")
        if low > high:
            raise ValueError(f"cfg_interval must be [low, high] with low <= high, got {list(v)}")
        return v

    @field_validator("width")
    @classmethod
    def _check_pair(cls, v: int | None, info: ValidationInfo) -> int | None:
        if "height" not in info.data:  # height itself failed; its error says why
            return v
        height = info.data["height"]
        if height is None and v is not None:
            raise ValueError("height is missing: give both height and width, or neither (the default size)")
        if height is not None and v is None:
            raise ValueError("width is missing: give both height and width, or neither (the default size)")
        return v

    @field_validator("aspect_ratio")
    @classmethod
    def _check_preset(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        preset = ASPECT_PRESETS[v]
        given = (info.data.get("height"), info.data.get("width"))
        if given != (None, None) and given != preset:
            raise ValueError(
                f"aspect_ratio {v!r} means height={preset[0]}, width={preset[1]}; "
                "give either aspect_ratio or height and width, not both"
            )
        return v

    @model_validator(mode="after")
    def _resolve_size(self) -> _ImageJob:
        if self.aspect_ratio is not None:
            self.height, self.width = ASPECT_PRESETS[self.aspect_ratio]
        return self

    def _common_kwargs(self) -> dict[str, Any]:
        """The sampling arguments; ``None`` ones are left out so the pipeline applies the mode's default."""
        kwargs = {
            "prompt": self.prompt,
            "height": self.height,
            "width": self.width,
            "num_steps": self.num_steps,
            "cfg_text_scale": self.cfg_text_scale,
            "cfg_img_scale": self.cfg_img_scale,
            "cfg_interval": self.cfg_interval,
            "timestep_shift": self.timestep_shift,
            "cfg_renorm_type": self.cfg_renorm_type,
            "cfg_renorm_min": self.cfg_renorm_min,
            "seed": self.seed,
            "num_images": self.num_images,
        }
        return {k: v for k, v in kwargs.items() if v is not None}


class GenerateJob(_ImageJob):
    """Text-to-image: a prompt, a size (or the 1024x1024 default) and sampling parameters."""

    kind: ClassVar[str] = "generate"

    def to_pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Echo4oPipeline.__call__`` (``callback`` and output options excluded)."""
        return self._common_kwargs()


class MultirefJob(_ImageJob):
    """Multi-reference generation: 1..max_references stored reference images plus an instruction.

    ``references`` are paths relative to the data dir (the gateway stores uploads under
    ``uploads/<job_id>/<n>.png``); without a size the output follows the last reference.
    """

    kind: ClassVar[str] = "multiref"

    references: list[str] = Field(..., min_length=1, description="Stored reference images, relative to data_dir.")

    @field_validator("references")
    @classmethod
    def _check_references(cls, v: list[str]) -> list[str]:
        limit = get_settings().max_references
        if len(v) > limit:
            raise ValueError(f"{len(v)} reference images given; at most {limit} are allowed (ECHO4O_MAX_REFERENCES)")
        for i, ref in enumerate(v):
            path = PurePosixPath(ref)
            if not ref or "\\" in ref or "\x00" in ref or path.is_absolute() or ".." in path.parts:
                raise ValueError(f"references.{i} must be a relative path inside the data dir, got {ref!r}")
        return v

    def reference_paths(self, data_dir: Path | None = None) -> list[Path]:
        """Absolute paths of the references under ``data_dir`` (default: the configured one)."""
        root = Path(data_dir) if data_dir is not None else get_settings().data_dir
        return [root / ref for ref in self.references]

    def to_pipeline_kwargs(self, data_dir: Path | None = None) -> dict[str, Any]:
        """Keyword arguments for ``Echo4oPipeline.__call__``, with the references opened as RGB PIL images.

        Raises ``ValueError`` naming ``references.<i>`` when a stored reference is missing or unreadable.
        """
        from PIL import Image, UnidentifiedImageError

        images = []
        for i, path in enumerate(self.reference_paths(data_dir)):
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"references.{i}: cannot read stored reference {path}: {exc}") from exc
        return {**self._common_kwargs(), "images": images}


#: Payload model of each image job kind.
JOB_MODELS: dict[str, type[_ImageJob]] = {"generate": GenerateJob, "multiref": MultirefJob}


# ------------------------------------------------------------------------------------------------------------
# Benchmark runs (kind "benchmark"): the run is one job; each of its images is an ordinary generate/multiref job
# (``parent_id`` = the run) on the gpu queue, so every worker shares the work. See docs/benchmarks.md.
# ------------------------------------------------------------------------------------------------------------
BenchmarkSuite = Literal["geneval_pp", "imagine", "geneval", "custom"]
#: Benchmark suites (read by ``worker.evaluation.suites``); ``geneval`` is scored by a detector, the rest by a judge.
BENCHMARK_SUITES: tuple[str, ...] = get_args(BenchmarkSuite)
MAX_BENCHMARK_IMAGES_PER_PROMPT = 16
MAX_BENCHMARK_LIMIT = 1000
#: The progress stage of a running image job whose sampling waits while a job of a higher priority runs
#: (worker/preemption.py); its progress detail is ``{"preempted_by": <job id>}``.
PAUSED_STAGE = "paused"
#: Queue priority of a run's image jobs: below users' default, so interactive jobs go first.
BENCHMARK_IMAGE_PRIORITY = 1
#: Queue priority of a run's own re-enqueued phases: the lowest, so its pending images run before it looks again.
BENCHMARK_RUN_PRIORITY = 0
_JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class BenchmarkJob(_Webhook):
    """A benchmark run: a suite's prompts (first ``limit`` per group), each made into ``images_per_prompt`` image
    jobs, judged and scored. ``None`` generation fields mean the paper's evaluation settings (1024 px, 50 steps,
    seed 42; 4 images per prompt for GenEval, else 1). The judge's URL and model are recorded (the gateway's
    ECHO4O_JUDGE_* settings fill them when absent); its API key never is: the worker reads ECHO4O_JUDGE_API_KEY."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: ClassVar[str] = "benchmark"

    suite: BenchmarkSuite = Field(..., description="Benchmark suite.")
    prompts: str | None = Field(
        None, min_length=1, max_length=500, validate_default=True,
        description="Prompt file, relative to the data dir (required for custom). None: the pinned public file, "
                    "kept under <data_dir>/benchmarks/<suite>/ (downloaded when absent).")
    limit: int | None = Field(None, ge=1, le=MAX_BENCHMARK_LIMIT, description="First N prompts of each group.")
    images_per_prompt: int | None = Field(
        None, ge=1, le=MAX_BENCHMARK_IMAGES_PER_PROMPT, description="Images per prompt; None: the paper's.")
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE,
                               description="Image height; None: the paper's 1024.")
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE,
                              description="Image width; None: the paper's 1024.")
    num_steps: int | None = Field(None, ge=MIN_STEPS, le=MAX_STEPS, description="Schedule points; None: 50.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Seed of each prompt's first image; None: 42.")
    model_version: str | None = Field(
        None, min_length=1, max_length=200, description="Served model version to evaluate; None: the worker's.")
    judge_url: str | None = Field(None, max_length=500, validate_default=True,
                                  description="OpenAI-compatible API root of the judge; None: ECHO4O_JUDGE_URL.")
    judge_model: str | None = Field(None, min_length=1, max_length=200, description="Judge model name.")
    compare_to: str | None = Field(None, pattern=_JOB_ID_PATTERN,
                                   description="Another benchmark run's job id, shown side by side in the report.")

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            if info.data.get("suite") == "custom":
                raise ValueError("the custom suite needs a prompt file: give the path of a jsonl inside the data dir")
            return v
        path = PurePosixPath(v)
        if "\\" in v or "\x00" in v or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"prompts must be a relative path inside the data dir, got {v!r}")
        return v

    @field_validator("judge_url")
    @classmethod
    def _check_judge_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = v or get_settings().judge_url or None
        if v is None:
            suite = info.data.get("suite")
            if suite not in (None, "geneval"):
                raise ValueError(f"{suite} is scored by a judge: give judge_url or set ECHO4O_JUDGE_URL")
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"judge_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("width")
    @classmethod
    def _check_pair(cls, v: int | None, info: ValidationInfo) -> int | None:
        if "height" in info.data and (info.data["height"] is None) != (v is None):
            raise ValueError("give both height and width, or neither (the paper's 1024x1024)")
        return v

    @model_validator(mode="after")
    def _resolve_judge_model(self) -> BenchmarkJob:
        if self.judge_url is not None and self.judge_model is None:
            self.judge_model = get_settings().judge_model
        return self

    def generation_overrides(self) -> dict[str, Any]:
        """The generation settings this run sets; the rest are the paper's."""
        fields = {"height": self.height, "width": self.width, "num_steps": self.num_steps, "seed": self.seed,
                  "images_per_prompt": self.images_per_prompt}
        return {k: v for k, v in fields.items() if v is not None}


JOB_MODELS["benchmark"] = BenchmarkJob  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------------------
# Fine-tuning runs (kind "finetune", queue "train"). Training defaults are the trainer's alone
# (worker.training.trainer.TrainConfig): a field left None here means "the trainer's default", read there only.
# ------------------------------------------------------------------------------------------------------------
FinetuneLayout = Literal["auto", "t2i", "multiref", "echo4o"]
FINETUNE_LAYOUTS: tuple[str, ...] = get_args(FinetuneLayout)
FinetuneMode = Literal["lora", "full"]
FINETUNE_MODES: tuple[str, ...] = get_args(FinetuneMode)
MAX_TRAIN_STEPS = 1_000_000
MAX_TRAIN_TOKENS = 131_072
_VERSION_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HUB_DATASET_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def dataset_roots() -> list[Path]:
    """Folders a fine-tuning job may read a local dataset from: the data dir and ``ECHO4O_DATASETS_DIR``."""
    settings = get_settings()
    roots = [settings.data_dir]
    if settings.datasets_dir is not None:
        roots.append(settings.datasets_dir.expanduser().resolve())
    return roots


class FinetuneJob(_Webhook):
    """A fine-tuning run: train ``base_version`` on ``dataset`` for ``steps`` optimizer steps and store the
    result as model version ``output_name/output_version`` under the weights dir.

    Every optional training field left ``None`` takes the trainer's default (``TrainConfig``, the one place
    they are written); :meth:`to_train_kwargs` passes only the given ones. ``base_version`` None means the
    current version (the promoted one, else the configured model); the gateway fills it in on submit.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: ClassVar[str] = "finetune"

    dataset: str = Field(..., min_length=1, max_length=1000, description=(
        "Training data: an absolute path inside the data dir or ECHO4O_DATASETS_DIR (a parquet file or a folder of "
        "parquet files / Echo-4o-Image shards), or a Hugging Face Hub dataset id (owner/name)."))
    layout: FinetuneLayout = Field("auto", description=(
        "auto: detected per file; t2i (image + captions), multiref (image_list + instruction_list) or echo4o "
        "(Echo-4o-Image .tar shards): every data file must have this layout."))
    mode: FinetuneMode | None = Field(None, description="lora (adapters on the generation expert) or full.")
    steps: int | None = Field(None, ge=1, le=MAX_TRAIN_STEPS, description="Optimizer steps.")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="Peak learning rate (Echo-4o: 2e-5).")
    warmup_steps: int | None = Field(None, ge=0, le=MAX_TRAIN_STEPS, description="Linear warm-up steps.")
    expected_tokens: int | None = Field(None, ge=1, le=MAX_TRAIN_TOKENS, description=(
        "Token budget of one step's pack: samples are added until it holds this many (give max_tokens too)."))
    max_tokens: int | None = Field(None, ge=1, le=MAX_TRAIN_TOKENS, validate_default=True, description=(
        "Most tokens in one pack, and in one sample (give expected_tokens too)."))
    vae_min_size: int | None = Field(None, ge=16, le=MAX_SIDE, description=(
        "Images are resized so their shortest side is at least this (give vae_max_size too)."))
    vae_max_size: int | None = Field(None, ge=16, le=MAX_SIDE, validate_default=True, description=(
        "Images are resized so their longest side is at most this (give vae_min_size too)."))
    save_every: int | None = Field(None, ge=1, le=MAX_TRAIN_STEPS, description=(
        "A checkpoint every this many steps: a job whose worker dies resumes from the last one."))
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Seed of the data order, noise and LoRA init.")
    base_version: str | None = Field(None, min_length=1, max_length=200, description=(
        "Model version to start from: name/version under the weights dir, or the served model's version; "
        "None: the served model."))
    output_name: str | None = Field(None, description="Name of the new version; None: the base's name.")
    output_version: str | None = Field(None, description="Version label; None: ft-<date>-<job id prefix>.")
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY, description="Queue priority (train queue).")

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("dataset must not contain NUL characters")
        text = v.strip().removeprefix("hf://").removeprefix("datasets/") if v.startswith("hf://") else v.strip()
        if not text.startswith(("/", "~", ".")) and _HUB_DATASET_RE.match(text):
            return text
        roots = dataset_roots()
        where = " or ".join(str(r) for r in roots)
        path = Path(text).expanduser()
        if not path.is_absolute():
            raise ValueError(f"{v!r} is neither an absolute path nor a Hub dataset id (owner/name); give the "
                             f"absolute path of a dataset inside {where}, or a Hub dataset id")
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise ValueError(f"{v!r} is outside the folders datasets may be read from ({where}); move it there "
                             "or set ECHO4O_DATASETS_DIR")
        try:
            exists = resolved.exists()
        except OSError as exc:  # a name too long, a permission problem: the path cannot be used either way
            raise ValueError(f"the path cannot be read ({exc.strerror}); give an existing dataset inside {where}") \
                from None
        if not exists:
            raise ValueError(f"{resolved} does not exist; give an existing parquet file or folder inside {where}")
        return str(resolved)

    @field_validator("output_name", "output_version")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and not _VERSION_PART_RE.match(v):
            raise ValueError(f"{v!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("base_version")
    @classmethod
    def _check_base(cls, v: str | None) -> str | None:
        if v is not None and (v.startswith("/") or "\\" in v or "\x00" in v or ".." in PurePosixPath(v).parts):
            raise ValueError(f"{v!r} must be a version name (name/version), not a path")
        return v

    @field_validator("max_tokens", "vae_max_size")
    @classmethod
    def _check_pair(cls, v: int | None, info: ValidationInfo) -> int | None:
        low, high = {"max_tokens": ("expected_tokens", "max_tokens"),
                     "vae_max_size": ("vae_min_size", "vae_max_size")}[info.field_name]
        if low not in info.data:  # the low field itself failed; its error says why
            return v
        a = info.data[low]
        if (a is None) != (v is None):
            missing = low if a is None else high
            raise ValueError(f"{missing} is missing: give both {low} and {high}, or neither (the trainer's defaults)")
        if a is not None and a > v:
            raise ValueError(f"{low} ({a}) must not exceed {high} ({v})")
        return v

    def output_ref(self, job_id: str, base_ref: str) -> tuple[str, str]:
        """``(name, version)`` of the version this job writes: the given ones, else the base's name (the part
        before ``/``, or ``finetune``) and ``ft-<UTC date>-<first 8 characters of the job id>``."""
        from datetime import UTC, datetime

        base_name = base_ref.split("/", 1)[0] if base_ref else ""
        name = self.output_name or (base_name if _VERSION_PART_RE.match(base_name) else "finetune")
        version = self.output_version or f"ft-{datetime.now(UTC):%Y%m%d}-{job_id[:8]}"
        return name, version

    def to_train_kwargs(self) -> dict[str, Any]:
        """``TrainConfig`` keyword arguments of the given fields only (``base_model``, ``data`` and
        ``output_dir`` are the caller's); ``max_tokens`` also caps one sample."""
        kwargs = {
            "mode": self.mode, "total_steps": self.steps, "lr": self.lr, "warmup_steps": self.warmup_steps,
            "expected_tokens": self.expected_tokens, "max_tokens": self.max_tokens,
            "max_tokens_per_sample": self.max_tokens, "vae_min_size": self.vae_min_size,
            "vae_max_size": self.vae_max_size, "save_every": self.save_every, "seed": self.seed,
        }
        return {k: v for k, v in kwargs.items() if v is not None}


JOB_MODELS["finetune"] = FinetuneJob  # type: ignore[assignment]


def parse_job(kind: str, params: dict[str, Any]) -> GenerateJob | MultirefJob:
    """Validate stored params for ``kind``; raises ``ValueError`` for an unknown kind and pydantic's
    ``ValidationError`` (a ``ValueError``) for bad params."""
    try:
        model = JOB_MODELS[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {sorted(JOB_MODELS)}, got {kind!r}") from None
    return model.model_validate(params)  # type: ignore[return-value]


def describe_validation_error(err: Any) -> str:
    """One line per problem of a pydantic ``ValidationError``, each starting with the dotted field path."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
