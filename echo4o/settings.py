"""The one home of configuration: environment variables prefixed ``ECHO4O_`` (or a ``.env`` file).

Every component reads :func:`get_settings`; nothing else reads the environment.
"""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "Yejy53/Echo-4o"

Device = str  # "auto", "cpu", "cuda" or "cuda:N": what the engine's loader accepts
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N (N: a CUDA device index, e.g. cuda:0)"


class Settings(BaseSettings):
    """Effective settings of one process. Field names map to ``ECHO4O_<NAME>`` variables."""

    model_config = SettingsConfigDict(
        env_prefix="ECHO4O_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("data"), description="Results, uploads, reports, logs and the embedded broker live here."
    )
    weights_dir: Path = Field(
        Path("model_weights"), description="Local model versions: <weights_dir>/<name>/<version>/ + manifest.json."
    )
    datasets_dir: Path | None = Field(
        None, description="Besides the data dir, the folder fine-tuning jobs may read local datasets from."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL of the job/key records. Empty: SQLite at <data_dir>/echo4o.db."
    )

    # --- model ---------------------------------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL,
        description="A local folder in BAGEL's checkpoint layout or a Hugging Face Hub id.",
    )
    model_version: str = Field("", description="Name reported for the served model; empty: derived from `model`.")
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for gated or private repos.")
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    attention: Literal["auto", "sdpa", "xformers", "flash_attn"] = Field(
        "auto", description="auto: xformers, then flash_attn, then sdpa on CUDA; sdpa on CPU."
    )
    resident_models: int = Field(
        2, ge=1, le=64, description="Model versions a worker keeps loaded at most (least recently used evicted)."
    )
    resident_models_bytes: int = Field(
        0, ge=0, description="Parameter bytes a worker's resident versions may take; 0: 80 % of the CUDA device's "
                             "memory, no byte limit on the CPU (only resident_models)."
    )
    memory_mode: Literal["full", "int8", "nf4", "offload", "int8+offload", "nf4+offload"] = Field(
        "full", description="Weights on the card (bf16): full 27.4 GiB, int8 (LLM Linears 8-bit) 14.2, nf4 (4-bit) "
        "8.9, offload (idle parts in host memory, streamed) 13.3, int8+offload 7.2, nf4+offload 4.5; int4 is an "
        "alias of nf4. See docs/performance.md, \"Memory modes\".")
    # engine speed options (docs/performance.md, "Engine batching and caching")
    step_cache_threshold: float | None = Field(
        None, ge=0, description="Step caching (TeaCache-style): skip the model on denoising steps whose input "
        "changed less than this in total since the last computed step, reusing its velocity; empty or 0: off "
        "(exact). 0.1 is the measured default setting: faster, slightly different images.")
    torch_compile: bool = Field(False, description="torch.compile the per-step forward at load (slow first "
                                "steps; refused at load where the backend cannot compile, e.g. no C compiler).")

    @field_validator("step_cache_threshold", mode="before")
    @classmethod
    def _empty_threshold_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    # --- queue ---------------------------------------------------------------------------------
    broker_url: str = Field(
        "", description="Celery broker, e.g. redis://localhost:6379/0. Empty: embedded broker (no server needed)."
    )
    result_backend_url: str = Field("", description="Celery result backend. Empty: same Redis as the broker, "
                                                    "or the embedded one.")
    job_timeout_s: int = Field(3600, ge=10, le=7 * 24 * 3600, description="Longest a single job may run.")
    train_processes: int = Field(
        1, ge=1, le=64, description="Training processes of a finetune job: 1 trains in the worker's process; N > 1 "
        "starts `torchrun --standalone --nproc_per_node N -m worker.training.distributed` (full mode sharded "
        "with FSDP) as a subprocess of the worker.")
    broker_visibility_timeout_s: int = Field(
        0,
        ge=0,
        description="Seconds after which Redis hands an unacknowledged job (its worker died) to another "
        "worker; must exceed job_timeout_s. 0: job_timeout_s + 10 % + 60.",
    )
    worker_heartbeat_s: float = Field(5.0, gt=0, le=60, description="Seconds between a worker's heartbeats; a worker "
                                      "silent for 3 of them is dead and its running jobs are requeued.")
    worker_shutdown_grace_s: float = Field(
        25.0, ge=0, le=24 * 3600,
        description="On SIGTERM a worker lets its running job finish for this long, then requeues it (another "
        "worker runs it) and exits. Below the 30 s most supervisors (Kubernetes, `echo4o serve`) wait before SIGKILL.",
    )
    preview_every: int = Field(0, ge=0, le=100, description="Workers store a small preview every N steps; 0: none.")
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of the PNGs workers write: 0 stores the pixels unfiltered and "
        "uncompressed, 1-9 compress them with zlib's run-length strategy, where the level does not change the file. "
        "Encoding runs on the worker between sampling and the job's answer (echo4o/png_encoder.py; "
        "benchmarks/png_bench.py gives the figures).",
    )
    progress_interval_s: float = Field(
        0.25, ge=0, le=10, description="A running job's progress is written to its row at most this often (the "
        "event streams still show every step: the steps in between arrive together). Each write costs the worker "
        "a statement and wakes the job's watchers in the gateway; on a CPU machine whose cores the sampling keeps "
        "busy, that slows the sampling.",
    )
    # cross-request batching (worker/batching.py; docs/contracts.md, "Cross-request batching")
    batch_max_size: int = Field(4, ge=1, le=64, description="A worker samples up to this many queued image jobs of "
                                "one model version and shape (size, steps, shift) together, one packed forward per "
                                "step; 1: off (each job alone).")
    batch_wait_ms: int = Field(50, ge=0, le=10_000, description="How long a job that found compatible queued jobs "
                               "waits for more to arrive before its batch starts (a job with none starts at once, "
                               "and so does one behind which a higher-priority job of another shape is queued).")
    # priority preemption (worker/preemption.py; docs/contracts.md, "Priority preemption")
    preemption: bool = Field(True, description="A queued image job of a higher priority than every job a worker is "
                             "sampling (same model version) pauses that sampling between two steps and runs first; "
                             "the paused jobs then go on where they were, with the same result. Their memory stays "
                             "held meanwhile: turn this off where a second job does not fit beside a running batch.")
    preempt_after_s: float = Field(0.25, ge=0, le=600, description="How long a busy worker must have seen such a job "
                                   "queued before it preempts for it: an idle worker takes a job within milliseconds, "
                                   "so one still queued this long has no other worker to run it.")

    # --- gateway -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gateway binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    public_url: str = Field("", description="Base URL used in links returned to clients; empty: from the request.")
    auth: Literal["keys", "off"] = Field(
        "keys", description="keys: every request needs an API key. off: open, allowed on loopback binds only."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Browser origins allowed to call the API (CORS), comma-separated or a "
        "JSON list, e.g. https://ui.example.com; empty (default): no CORS headers, so browsers on other origins "
        "are refused.")

    # --- webhooks (see docs/api.md, "Webhooks") ----------------------------------------------------
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs whose host resolves to a private, loopback, link-local or other "
                           "non-public address (tests, a receiver on the same network). Off: refused at submit "
                           "(422) and again at delivery.")
    webhook_poll_s: float = Field(1.0, gt=0, le=60, description="How often a gateway looks for due deliveries.")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Seconds one delivery attempt may take.")
    webhook_max_attempts: int = Field(8, ge=1, le=50, description="Attempts before a delivery is given up.")
    webhook_retry_base_s: float = Field(
        10.0, gt=0, le=3600, description="Wait after the first failed attempt; doubled after each further one, "
                                         "at most webhook_retry_max_s.")
    webhook_retry_max_s: float = Field(3600.0, gt=0, le=86400, description="Longest wait between two attempts.")

    # --- limits --------------------------------------------------------------------------------
    max_prompt_chars: int = Field(4000, ge=1, le=100_000, description="Longest prompt or instruction accepted.")
    max_references: int = Field(6, ge=1, le=16, description="Most reference images one /multiref job may send.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest uploaded image file, in bytes.")
    max_image_pixels: int = Field(40_000_000, ge=1024, description="Refused before decoding (bomb guard).")
    rate_limit_per_minute: int = Field(60, ge=1, description="Jobs one key may submit per minute.")
    max_queued_jobs_per_key: int = Field(16, ge=1, description="Queued + running jobs one key may have.")
    wait_max_s: float = Field(600.0, ge=0, description="Upper bound of ?wait=SECONDS.")
    gateway_processes: int = Field(
        1, ge=1, le=64, description="HTTP processes of `echo4o serve` sharing its port (uvicorn's process "
                                    "supervisor); more than 1 spreads request handling over that many cores.")
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Seconds a client has to send a request's whole body (`echo4o serve`); "
                                         "slower ones get 408 and the connection is closed (slow-client guard).")

    # --- demo UI (echo4o ui) ----------------------------------------------------------------------
    ui_api_url: str = Field("http://127.0.0.1:8000", description="The gateway the demo UI calls.")
    ui_api_key: SecretStr | None = Field(
        None, description="API key the UI uses for sessions that enter none (an admin key shows the admin tab)."
    )
    ui_host: str = Field("127.0.0.1", description="Address the demo UI binds.")
    ui_port: int = Field(7860, ge=1, le=65535, description="Port the demo UI listens on.")
    ui_concurrency: int = Field(16, ge=1, le=1024, description="Jobs the UI follows at once (Gradio concurrency).")
    ui_max_queue: int = Field(64, ge=1, description="Requests waiting in the UI's Gradio queue before refusing.")

    # --- benchmark judge (echo4o bench) ---------------------------------------------------------
    judge_url: str = Field(
        "", description="OpenAI-compatible API root of the benchmark judge, e.g. https://api.openai.com/v1 or a "
                        "local vLLM/SGLang/Ollama server's /v1. Empty: no judge (images are made, not scored)."
    )
    judge_model: str = Field("gpt-4.1-2025-04-14", description="Judge model name (GPT-4.1, as in the paper).")
    judge_api_key: SecretStr | None = Field(None, description="API key of the judge; empty for a local server.")
    geneval_detector: str = Field(
        "", description="GenEval's object detector as 'package.module:function' ((record, image) -> {correct, "
                        "reason}); empty: GenEval images are made and left unscored."
    )

    # --- logging -------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log records written (any case accepted).")
    log_format: Literal["json", "text"] = Field(
        "text", description="text: one readable line a record; json: one JSON object a record, with its fields.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        """``a,b`` or a JSON list, from the environment; origins compared without a trailing slash."""
        if isinstance(v, str):
            v = json.loads(v) if v.strip().startswith("[") else v.split(",")
        if isinstance(v, list):
            return [o.strip().rstrip("/") for o in v if isinstance(o, str) and o.strip()]
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        """Only the devices the engine can load onto; anything else (``mps``, ``tpu``) is refused here, at start,
        rather than when the model loads."""
        v = v.strip().lower()
        if v in {"auto", "cpu", "cuda"}:
            return v
        if v.startswith("cuda:") and v[5:].isdigit():
            return v
        raise ValueError(f"must be {DEVICE_CHOICES}")

    @field_validator("dtype", "attention", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        """Spelled as the engine accepts them: any case, and a dtype with or without ``torch.``."""
        return v.strip().lower().removeprefix("torch.") if isinstance(v, str) else v

    @field_validator("memory_mode", mode="before")
    @classmethod
    def _memory_mode(cls, v: object) -> object:
        """Any case and order (``offload+int8``), ``int4`` for ``nf4``: spelled as the canonical mode."""
        if not isinstance(v, str):
            return v
        tokens = [t.strip().lower().replace("int4", "nf4") for t in v.replace(",", "+").split("+")]
        quant = [t for t in tokens if t != "offload"]
        return "+".join(quant + ["offload"] * tokens.count("offload"))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.weights_dir = self.weights_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'echo4o.db'}"
        if not self.model_version:
            self.model_version = Path(self.model.rstrip("/")).name or self.model
        if not self.broker_visibility_timeout_s:
            self.broker_visibility_timeout_s = int(self.job_timeout_s * 1.1) + 60
        elif self.broker_visibility_timeout_s <= self.job_timeout_s:
            raise ValueError(
                f"broker_visibility_timeout_s ({self.broker_visibility_timeout_s}) must exceed job_timeout_s "
                f"({self.job_timeout_s}), else a long job is handed to a second worker while the first still "
                "runs it: raise ECHO4O_BROKER_VISIBILITY_TIMEOUT_S or set it to 0 (automatic)"
            )
        return self

    # --- derived ---------------------------------------------------------------------------------
    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    def check_bind(self, host: str | None = None) -> None:
        """Refuse open mode on an address other hosts can reach."""
        host = host or self.host
        if self.auth == "off" and not is_loopback(host):
            raise ValueError(
                f"ECHO4O_AUTH=off is only allowed on a loopback address, not {host!r}: "
                "bind 127.0.0.1, or create keys with `echo4o keys create` and set ECHO4O_AUTH=keys"
            )

    def masked(self) -> dict[str, object]:
        """Effective settings with secrets and URL passwords masked, for printing."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********" if value.get_secret_value() else ""
            elif isinstance(value, str) and "://" in value:
                value = mask_url_password(value)
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


def is_loopback(host: str) -> bool:
    if host in {"localhost", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def mask_url_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, hostpart = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:****@{hostpart}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once. Tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()
