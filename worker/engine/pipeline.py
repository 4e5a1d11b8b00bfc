"""``Echo4oPipeline``: text-to-image and multi-reference generation with BAGEL / Echo-4o.

``__call__`` reads as the algorithm: check inputs, build the three contexts (full, text-dropped,
image-dropped) into KV caches once, prepare the initial latent from one CPU generator, compute the timesteps,
denoise (guidance, callback, cancel), decode, return a :class:`Echo4oPipelineOutput`. Random draws happen in
the reference's order, so the same seed gives the same image on any device: each reference image's VAE
posterior sample, then the initial noise of each output image.

Defaults and limits of a call (steps, seed range, images per call, per-mode guidance) are the job contract's,
read from :mod:`echo4o.jobs`; sizes are checked against the loaded model (its latent stride and largest side).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from echo4o.jobs import (
    DEFAULT_RENORM_MIN,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_TIMESTEP_SHIFT,
    MAX_NUM_IMAGES,
    MAX_STEPS,
    MIN_STEPS,
    MODE_DEFAULTS,
    RENORM_TYPES,
    SEED_MAX,
)
from echo4o.logging import get_logger
from echo4o.settings import DEFAULT_MODEL, get_settings
from worker.engine import sampler
from worker.engine.attention import resolve_backend
from worker.engine.config import BagelConfig
from worker.engine.host_allocator import keep_freed_memory
from worker.engine.image_processing import VAE_RULE, PreparedReference, prepare_reference, resized_size
from worker.engine.loading import (  # noqa: F401 - resolve_device/resolve_dtype/CheckpointError: re-exported
    CheckpointError,
    load_bagel,
    load_model_tokenizer,
    load_vae,
    load_weights,
    plan_placement,
    read_config,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
)
from worker.engine.models.bagel import Bagel, DenoiseLayout, SpecialTokens
from worker.engine.models.qwen2_mot import KVCache
from worker.engine.models.vae import FluxVAE
from worker.engine.step_cache import StepCache, check_threshold

log = get_logger(__name__)

#: ``params["mode"]`` of a call without reference images, and of one with them.
TEXT_TO_IMAGE = "text-to-image"
MULTI_REFERENCE = "multi-reference"
#: The job kind (the key of ``echo4o.jobs.MODE_DEFAULTS``) whose defaults each mode uses.
JOB_KIND_OF_MODE = {TEXT_TO_IMAGE: "generate", MULTI_REFERENCE: "multiref"}
PREVIEW_SIZE = 256
#: The most output pixels one VAE decoder call of a batch takes (several images of a batch decode together).
DECODE_PIXELS = 4 * 1024 * 1024

Callback = Callable[[int, int, "Image.Image | None"], Any]


@dataclass(frozen=True)
class GenerationParams:
    """Every parameter of one call, checked and with the mode's defaults resolved (see ``check_inputs``).

    ``height`` / ``width`` are ``None`` only between the check and the reading of the references (a
    multi-reference call without a size takes the last reference's); ``__call__`` fills them with
    ``dataclasses.replace`` before sampling. ``to_dict()`` is what :attr:`Echo4oPipelineOutput.params` holds.
    """

    mode: str
    prompt: str
    num_references: int
    height: int | None
    width: int | None
    num_steps: int
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    timestep_shift: float
    cfg_renorm_type: str
    cfg_renorm_min: float
    seed: int
    num_images: int
    output_type: str
    attention: str
    dtype: str
    device: str
    model: str
    step_cache: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (``cfg_interval`` a list), the keys in field order: PNG metadata and job results."""
        data = dataclasses.asdict(self)
        data["cfg_interval"] = list(self.cfg_interval)
        return data


@dataclass
class Echo4oPipelineOutput:
    """What one call produced.

    ``images``: PIL images, or with ``output_type="latent"`` the final packed latent tokens, each a float32
    CPU tensor ``(h * w, p * p * C)`` (token ``i * w + j`` is grid cell ``(i, j)``, features in ``(p, q, c)``
    order). ``params``: every parameter actually used, defaults resolved, as plain JSON values
(:meth:`GenerationParams.to_dict`; PNG metadata and job results store it). ``timings``: seconds per stage.
    """

    images: list
    params: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Contexts:
    """The KV caches the latent query attends to: full, text-dropped and image-dropped."""

    full: KVCache
    text_dropped: KVCache
    image_dropped: KVCache
    layouts: dict[tuple[int, ...], DenoiseLayout] = field(default_factory=dict)

    def release(self) -> None:
        """Drop every cached key, value and step buffer (the call is over, or was cancelled)."""
        self.layouts.clear()
        for cache in (self.full, self.text_dropped, self.image_dropped):
            cache.keys = [None] * len(cache.keys)
            cache.values = [None] * len(cache.values)


class Echo4oPipeline:
    """BAGEL / Echo-4o image generation: a prompt, optionally with reference images, in; images out.

    It holds the mixture-of-transformers model (:class:`~worker.engine.models.bagel.Bagel`), the FLUX VAE, the
    Qwen2 tokenizer with the ids of its framing tokens, and the attention backend chosen at load time. It
    keeps no state between calls: each call builds its own KV caches and frees them when it returns or raises.

    Load a checkpoint in the released layout (a folder, or a Hugging Face Hub id) with :meth:`from_pretrained`;
    call the pipeline with a prompt. Without ``images`` it draws the prompt (text-to-image, 1024x1024 by
    default); with ``images`` it follows the instruction using the references (multi-reference; the output
    takes the last reference's size unless ``height`` and ``width`` are given). Guidance parameters left as
    ``None`` take the mode's defaults from :data:`echo4o.jobs.MODE_DEFAULTS`. Same seed, same image, on any
    device.

    Example::

        pipe = Echo4oPipeline.from_pretrained("Yejy53/Echo-4o", device="cuda", dtype="bfloat16")
        out = pipe("a red panda asleep on a bed", height=768, width=1024, num_steps=50, seed=42)
        out.images[0].save("panda.png")
        edit = pipe("put the panda on the sofa", images=[Image.open("panda.png"), Image.open("sofa.png")],
                    seed=7, callback=lambda step, total, preview: print(step, "/", total))
    """

    def __init__(self, model: Bagel, vae: FluxVAE, tokenizer: Any, special: SpecialTokens, *,
                 attention_backend: str, source: str = "", device: torch.device | None = None):
        """Assemble loaded parts (:meth:`from_pretrained` does this). ``source`` is recorded as ``params["model"]``;
        ``device`` defaults to the model's (with a device map: where its inputs go)."""
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.special = special
        self.attention_backend = attention_backend
        self.source = source
        self.device = device or model.device
        self.dtype = model.dtype
        #: Benchmarks only: run each guidance branch (and each request's) as its own velocity call instead of
        #: one packed call (the same results; ``benchmarks/engine_bench.py`` times both).
        self._sequential_branches = False
        #: The step-cache threshold of calls that pass none (``None``: off); see :mod:`worker.engine.step_cache`.
        self.step_cache_threshold: float | None = None

    @property
    def config(self) -> BagelConfig:
        """The model's configuration (LLM, ViT and VAE configs, latent patching)."""
        return self.model.config

    # ================================================================================ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        attention: str = "auto",
        device_map: str | dict | None = "auto",
        token: str | None = None,
        cache_dir: str | None = None,
        memory_mode: str = "full",
        step_cache: float | None = None,
        compile: bool | None = None,  # noqa: A002 - the option's public name
    ) -> Echo4oPipeline:
        """Load a checkpoint in the released layout from a local folder or a Hugging Face Hub id.

        ``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. ``dtype``:
        ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``. ``attention``:
        ``auto``, ``sdpa``, ``xformers`` or ``flash_attn``. ``device_map``: ``auto`` spreads the model over
        the visible GPUs (then the CPU) with accelerate only when it does not fit the chosen card; ``None``
        never does; a dict is an accelerate device map. ``token`` / ``cache_dir``: for the Hub download.
        ``memory_mode``: ``full``, ``int8``, ``nf4``, ``offload``, ``int8+offload`` or ``nf4+offload`` for smaller
        cards (see :mod:`worker.engine.memory`). ``step_cache``: the step-cache threshold of calls that pass
        none (:mod:`worker.engine.step_cache`); ``None`` reads ``ECHO4O_STEP_CACHE_THRESHOLD`` (off when
        unset), 0 is off. ``compile``: ``torch.compile`` the decoder stack of the per-step forward (the
        first steps of each new batch shape are slow while it compiles); ``None`` reads
        ``ECHO4O_TORCH_COMPILE``. Where the backend cannot compile (no C++ compiler for inductor on the CPU,
        no Triton on CUDA) it is a ``ValueError`` naming the cause, raised here, before anything is loaded.

        A bad option is a ``ValueError`` naming it; missing, corrupt or mismatched files are a
        :class:`~worker.engine.loading.CheckpointError` naming the file and the fix.
        """
        t0 = time.perf_counter()
        if step_cache is None:
            step_cache = get_settings().step_cache_threshold
        step_cache = check_threshold(step_cache)
        if compile is None:
            compile = get_settings().torch_compile
        path = resolve_checkpoint(path_or_hub_id, token=token, cache_dir=cache_dir)
        config = read_config(path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if torch.device(device).type == "cpu":
            keep_freed_memory()  # no fresh pages for each step's activations (worker/engine/host_allocator.py)
        if compile:
            check_compile_backend(device)
        backend = resolve_backend(attention, device, dtype)
        if device_map == "auto":
            device_map = plan_placement(config, device, dtype, memory_mode)
        elif device_map is not None and not isinstance(device_map, dict):
            raise ValueError(f"device_map must be 'auto', None or a dict; got {device_map!r}")
        model, vae = load_weights(path, config, device, dtype, device_map=device_map, memory_mode=memory_mode)
        tokenizer, special = load_model_tokenizer(path, config)
        pipe = cls(model, vae, tokenizer, special, attention_backend=backend, source=str(path_or_hub_id),
                   device=device)
        pipe.step_cache_threshold = step_cache
        if compile:
            model._step_llm = torch.compile(model.llm.forward)
        log.info("model loaded", extra={"model": str(path_or_hub_id), "path": str(path), "device": str(device),
                                        "dtype": str(dtype).removeprefix("torch."), "attention": backend,
                                        "placement": "accelerate" if device_map else "single-device",
                                        "memory_mode": memory_mode,
                                        "load_s": round(time.perf_counter() - t0, 2)})
        return pipe

    # ================================================================================ generation
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str,
        images: Sequence[Image.Image] | Image.Image | None = None,
        height: int | None = None,
        width: int | None = None,
        num_steps: int = DEFAULT_STEPS,
        cfg_text_scale: float | None = None,
        cfg_img_scale: float | None = None,
        cfg_interval: Sequence[float] | None = None,
        timestep_shift: float = DEFAULT_TIMESTEP_SHIFT,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float = DEFAULT_RENORM_MIN,
        seed: int = 0,
        num_images: int = 1,
        output_type: str = "pil",
        callback: Callback | None = None,
        preview_every: int = 0,
        step_cache: float | None = None,
    ) -> Echo4oPipelineOutput:
        """Generate ``num_images`` images for ``prompt``, conditioned on ``images`` (references) if given.

        ``height`` / ``width``: both or neither; neither means 1024x1024 without references and the last
        reference's size (after the reference resize rule) with them. ``cfg_text_scale``, ``cfg_img_scale``,
        ``cfg_interval``, ``cfg_renorm_type``: ``None`` takes the mode's default (``echo4o.jobs.MODE_DEFAULTS``
        of ``generate`` or ``multiref``). ``seed`` in ``0..SEED_MAX``; the images of one call continue one
        random stream. ``output_type``: ``"pil"`` or ``"latent"`` (the packed latent tokens).

        ``num_steps`` is the number of schedule points (the reference's ``num_timesteps``): the sampler takes
        ``num_steps - 1`` Euler steps per image and ``callback(step, total, preview)`` runs after each one
        (``step`` from 1 to ``total = (num_steps - 1) * num_images``; ``preview`` a small PIL image every
        ``preview_every`` steps when > 0, else ``None``). The images of one call advance together (one packed
        forward per step, see :meth:`generate_batch`): step ``i`` of image ``k`` is number
        ``i * num_images + k + 1``. An exception raised in the callback stops sampling and propagates;
        nothing of the call is kept. Any invalid argument is a ``ValueError`` naming it, raised before any work.

        ``step_cache``: the step-cache threshold (:mod:`worker.engine.step_cache`; skip the model on steps whose
        input barely changed, reusing the last velocity); ``None`` takes the pipeline's
        ``step_cache_threshold`` (``ECHO4O_STEP_CACHE_THRESHOLD``, off by default), 0 turns it off. The
        steps that ran the model are ``timings["steps_computed"]``.
        """
        request = {"prompt": prompt, "images": images, "height": height, "width": width, "num_steps": num_steps,
                   "cfg_text_scale": cfg_text_scale, "cfg_img_scale": cfg_img_scale, "cfg_interval": cfg_interval,
                   "timestep_shift": timestep_shift, "cfg_renorm_type": cfg_renorm_type,
                   "cfg_renorm_min": cfg_renorm_min, "seed": seed, "num_images": num_images,
                   "output_type": output_type, "callback": callback, "preview_every": preview_every,
                   "step_cache": step_cache}
        (result,) = self.generate_batch([request])
        if isinstance(result, BaseException):
            raise result
        return result

    @staticmethod
    def batch_key(**kwargs: Any) -> tuple[int, int, int, float]:
        """The compatibility key of a request (``__call__``'s keyword arguments): see :func:`batch_key`."""
        return batch_key(**kwargs)

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[dict[str, Any]]) -> list[Echo4oPipelineOutput | BaseException]:
        """Run several requests together: each step of all of them is one packed forward of the model.

        Each request is a dict of ``__call__``'s keyword arguments (``prompt`` required). The requests must
        share ``height``, ``width``, ``num_steps`` and ``timestep_shift`` (their :func:`batch_key`): a
        mismatch is a ``ValueError`` naming it, raised before any work. Everything else is the request's own:
        prompt, references, seed (its own CPU generator: the same draws as alone), guidance scales, interval
        and renorm, callback and previews. Every (request, image, guidance branch) row of a step goes through
        one packed :meth:`Bagel.velocity` call, each row attending only its own context; the result of each
        request equals that of ``__call__`` alone (up to float rounding of the larger matrix products).

        Returns one entry per request, in order: its :class:`Echo4oPipelineOutput`, or the exception that
        ended it (an invalid argument, a callback that raised to cancel it, a failure of its prefill, guidance
        or decode); such a request leaves the batch at once and the others go on. A failure of a shared step
        forward (e.g. out of memory) ends every request still running, each slot holding that exception.
        ``timings``: ``prefill_s`` and ``decode_s`` the request's own, ``denoise_s`` the batch's sampling
        wall time, ``step_s`` that per step and image, ``batch_requests`` how many requests started
        sampling together.
        """
        t0 = time.perf_counter()
        results: list[Echo4oPipelineOutput | BaseException | None] = [None] * len(requests)
        jobs: list[_Request] = []
        for slot, request in enumerate(requests):
            try:
                jobs.append(self._start_request(slot, request))
            except Exception as exc:  # noqa: BLE001 - an invalid request fails alone
                results[slot] = exc
        _check_batch(jobs)
        try:
            # 2-3. each request's contexts into KV caches, then its initial latents, from its own generator
            for job in jobs:
                try:
                    self._prefill_request(job)
                except Exception as exc:  # noqa: BLE001 - one request's failure leaves the others running
                    results[job.slot] = exc
                    job.release()
            live = [job for job in jobs if results[job.slot] is None]
            # 4-5. timesteps, denoise: all live requests in lockstep
            if live:
                for slot, exc in self._denoise_batch(live).items():
                    results[slot] = exc
            for job in live:
                job.release()  # before decoding: the caches are the largest working memory
            # 6. decode: the images of all requests together, in chunks (one decoder call per chunk)
            done = [job for job in live if results[job.slot] is None]
            decoded = self._decode_batch(done)
            for job in done:
                try:
                    results[job.slot] = self._finish_request(job, t0, len(live), decoded)
                except Exception as exc:  # noqa: BLE001
                    results[job.slot] = exc
        finally:
            for job in jobs:
                job.release()
        return results  # type: ignore[return-value]

    def _start_request(self, slot: int, request: dict[str, Any]) -> _Request:
        """Check one request's arguments, resolve its defaults and size, prepare its references."""
        t0 = time.perf_counter()
        if not isinstance(request, dict):
            raise ValueError(f"each request must be a dict of __call__'s keyword arguments; got "
                             f"{type(request).__name__}")
        unknown = sorted(set(request) - set(REQUEST_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown request argument(s) {', '.join(unknown)}; the arguments are those of "
                             f"Echo4oPipeline.__call__: {', '.join(REQUEST_DEFAULTS)}")
        if "prompt" not in request:
            raise ValueError("prompt is required in each request")
        a = {**REQUEST_DEFAULTS, **request}
        references = _as_image_list(a["images"])
        params = self.check_inputs(a["prompt"], references, a["height"], a["width"], a["num_steps"],
                                   a["cfg_text_scale"], a["cfg_img_scale"], a["cfg_interval"], a["timestep_shift"],
                                   a["cfg_renorm_type"], a["cfg_renorm_min"], a["seed"], a["num_images"],
                                   a["output_type"], a["callback"], a["preview_every"], a["step_cache"])
        prepared = [prepare_reference(img) for img in references]
        if params.height is None:
            h, w = prepared[-1].size_hw if prepared else DEFAULT_SIZE
            self._check_size(h, w, from_reference=bool(prepared))
            params = dataclasses.replace(params, height=int(h), width=int(w))
        return _Request(slot=slot, params=params, callback=a["callback"], preview_every=a["preview_every"],
                        prepared=prepared, check_s=time.perf_counter() - t0)

    def _prefill_request(self, job: _Request) -> None:
        t0 = time.perf_counter()
        params = job.params
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        # draws each reference's VAE posterior sample, then one noise draw per image
        job.contexts = self.encode_contexts(params.prompt, job.prepared, generator)
        job.latents = [self.prepare_latents(self._grid(params), generator) for _ in range(params.num_images)]
        job.timings["prefill_s"] = job.check_s + time.perf_counter() - t0

    def _grid(self, params: GenerationParams) -> tuple[int, int]:
        return params.height // self.config.latent_downsample, params.width // self.config.latent_downsample

    def _decode_batch(self, jobs: list[_Request]) -> dict[int, tuple[list[Image.Image], float]]:
        """Decode the images of every ``pil`` request, several per decoder call (at most ``DECODE_PIXELS``
        pixels a call): slot -> (images, its share of the decode time). A single image decodes alone, as
        ``decode_latents`` does; a failed chunk is left out (each of its requests then decodes by itself)."""
        todo = [(job, k) for job in jobs if job.params.output_type == "pil" for k in range(len(job.latents))]
        if len(todo) < 2:
            return {}
        params = todo[0][0].params
        grid = self._grid(params)
        per_call = max(1, DECODE_PIXELS // (params.height * params.width))
        images: dict[tuple[int, int], Image.Image] = {}
        spent: dict[int, float] = {}
        for start in range(0, len(todo), per_call):
            chunk = todo[start:start + per_call]
            t0 = time.perf_counter()
            try:
                out = self.decode_latents_batch([job.latents[k] for job, k in chunk], grid)
            except Exception:  # noqa: BLE001 - retried request by request, so a failure lands on its own
                continue
            share = (time.perf_counter() - t0) / len(chunk)
            for (job, k), img in zip(chunk, out, strict=True):
                images[(job.slot, k)] = img
                spent[job.slot] = spent.get(job.slot, 0.0) + share
        return {job.slot: ([images[(job.slot, k)] for k in range(len(job.latents))], spent[job.slot])
                for job in jobs if all((job.slot, k) in images for k in range(len(job.latents)))
                and job.params.output_type == "pil"}

    def _finish_request(self, job: _Request, t0: float, batch_requests: int,
                        decoded: dict[int, tuple[list[Image.Image], float]]) -> Echo4oPipelineOutput:
        params, timings = job.params, job.timings
        t2 = time.perf_counter()
        if params.output_type == "latent":
            images = [x.float().cpu() for x in job.latents]
        elif job.slot in decoded:
            images, decode_s = decoded[job.slot]
            t2 -= decode_s
        else:
            images = [self.decode_latents(x, self._grid(params)) for x in job.latents]
        timings["decode_s"] = time.perf_counter() - t2
        steps = (params.num_steps - 1) * params.num_images
        timings["step_s"] = timings["denoise_s"] / steps if steps else 0.0
        timings["total_s"] = time.perf_counter() - t0
        timings["batch_requests"] = batch_requests
        return Echo4oPipelineOutput(images=images, params=params.to_dict(),
                                    timings={k: round(v, 4) for k, v in timings.items()})

    # -------------------------------------------------------------------------------- 1. inputs
    def check_inputs(self, prompt, references, height, width, num_steps, cfg_text_scale, cfg_img_scale,
                     cfg_interval, timestep_shift, cfg_renorm_type, cfg_renorm_min, seed, num_images, output_type,
                     callback, preview_every, step_cache=None) -> GenerationParams:
        """Validate every argument (``ValueError`` naming it) and return the parameters with the mode's
        defaults resolved; the size stays ``None`` when none was given (``__call__`` resolves it)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string; got {prompt!r:.80}")
        mode = MULTI_REFERENCE if references else TEXT_TO_IMAGE
        defaults = MODE_DEFAULTS[JOB_KIND_OF_MODE[mode]]
        if (height is None) != (width is None):
            raise ValueError("height and width must be given together (or neither, for the mode's default size)")
        if height is not None:
            self._check_size(height, width)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not MIN_STEPS <= num_steps <= MAX_STEPS:
            raise ValueError(f"num_steps must be an integer in {MIN_STEPS}..{MAX_STEPS} (schedule points; "
                             f"num_steps - 1 denoising steps); got {num_steps!r}")
        cfg_text_scale = _finite("cfg_text_scale", defaults.cfg_text_scale if cfg_text_scale is None
                                 else cfg_text_scale, low=0.0)
        cfg_img_scale = _finite("cfg_img_scale", defaults.cfg_img_scale if cfg_img_scale is None else cfg_img_scale,
                                low=0.0)
        interval = defaults.cfg_interval if cfg_interval is None else cfg_interval
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ValueError(f"cfg_interval must be two numbers (low, high); got {interval!r}") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"cfg_interval must satisfy 0 <= low <= high <= 1; got {interval!r}")
        timestep_shift = _finite("timestep_shift", timestep_shift)
        if timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0; got {timestep_shift}")
        renorm_type = defaults.cfg_renorm_type if cfg_renorm_type is None else cfg_renorm_type
        if renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {', '.join(RENORM_TYPES)}; got {renorm_type!r}")
        cfg_renorm_min = _finite("cfg_renorm_min", cfg_renorm_min, low=0.0)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) <= SEED_MAX:
            raise ValueError(f"seed must be an integer in 0..{SEED_MAX}; got {seed!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_NUM_IMAGES:
            raise ValueError(f"num_images must be an integer in 1..{MAX_NUM_IMAGES}; got {num_images!r}")
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent'; got {output_type!r}")
        if callback is not None and not callable(callback):
            raise ValueError("callback must be callable as callback(step, total, preview)")
        if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 0:
            raise ValueError(f"preview_every must be an integer >= 0; got {preview_every!r}")
        return GenerationParams(
            mode=mode, prompt=prompt, num_references=len(references),
            height=None if height is None else int(height), width=None if width is None else int(width),
            num_steps=num_steps, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
            cfg_interval=(lo, hi), timestep_shift=timestep_shift, cfg_renorm_type=renorm_type,
            cfg_renorm_min=cfg_renorm_min, seed=int(seed), num_images=num_images, output_type=output_type,
            attention=self.attention_backend, dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
            model=self.source,
            step_cache=check_threshold(self.step_cache_threshold if step_cache is None else step_cache),
        )

    def _check_size(self, height: Any, width: Any, from_reference: bool = False) -> None:
        step, largest = self.config.latent_downsample, self.config.max_image_size
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not (
                    step <= value <= largest and value % step == 0):
                where = " (from the last reference image)" if from_reference else ""
                raise ValueError(f"{name} must be a multiple of {step} in {step}..{largest}; got {value!r}{where}")

    # -------------------------------------------------------------------------------- 2. contexts
    def encode_contexts(self, prompt: str, references: list[PreparedReference],
                        generator: torch.Generator) -> _Contexts:
        """Prefill the KV caches: each reference as VAE tokens then ViT tokens, then the instruction (full);
        the references alone (text-dropped); the instruction alone (image-dropped)."""
        model, special, backend = self.model, self.special, self.attention_backend
        ids = self.encode_prompt(prompt)
        full = model.new_cache()
        for ref in references:
            image = ref.vae[None].to(self.device, self.vae_dtype)
            latent = self.vae.encode(image, generator)[0]
            model.prefill_vae_image(full, latent, special, backend)
            model.prefill_vit_image(full, ref.vit, special, backend)
        text_dropped = full.snapshot()
        model.prefill_text(full, ids, special, backend)
        if references:
            image_dropped = model.new_cache()
            model.prefill_text(image_dropped, ids, special, backend)
        else:
            image_dropped = full  # without images, dropping them changes nothing
        return _Contexts(full=full, text_dropped=text_dropped, image_dropped=image_dropped)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` (no framing tokens); a ``ValueError`` when an id is beyond the model's vocabulary."""
        encoded = self.tokenizer.encode(prompt)
        ids = list(getattr(encoded, "ids", encoded))
        vocab = self.config.llm.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"prompt encodes to token ids outside the model's vocabulary ({vocab}); the tokenizer "
                             f"files do not belong to this model")
        return ids

    # -------------------------------------------------------------------------------- 3. latents
    def prepare_latents(self, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """Initial noise ``(h * w, p * p * C)``, float32, drawn on the CPU (same numbers on any device)."""
        h, w = grid
        noise = torch.randn(h * w, self.config.patch_latent_dim, generator=generator, dtype=torch.float32)
        return noise.to(self.device)

    # -------------------------------------------------------------------------------- 5. denoise
    def _denoise_batch(self, jobs: list[_Request]) -> dict[int, Exception]:
        """Euler steps of every image of ``jobs`` over their shared schedule, in lockstep: per step, each
        request's guidance branches (three-branch guidance inside its cfg interval, one outside) for each of
        its images, all in one packed forward; then each request's guidance, update and callback. Updates
        ``job.latents`` in place; returns the requests that failed (slot -> exception), which left the batch."""
        model = self.model
        params = jobs[0].params  # the shared schedule and size (checked by _check_batch)
        grid = self._grid(params)
        schedule = sampler.timesteps(params.num_steps, params.timestep_shift)
        times, dts = sampler.step_sizes(schedule)  # on the CPU: the interval test needs no device sync
        times_dev, dts_dev = times.to(self.device), dts.to(self.device)
        total = len(times)
        position_ids = model.latent_position_ids(grid)
        frame = (model.embed_ids([self.special.start_of_image]), model.embed_ids([self.special.end_of_image]))
        failed: dict[int, Exception] = {}
        active = list(jobs)
        forward = _StepForward(self, grid[0] * grid[1], frame, position_ids)
        t1 = time.perf_counter()
        try:
            for job in jobs:
                job.steps_computed = 0
                if job.params.step_cache:
                    job.cache = StepCache(job.params.step_cache, total)
            for i in range(total):
                steps = {job.slot: job.guidance(times[i]) for job in active}
                computing = [job for job in active if self._must_compute(job, i, steps[job.slot], times_dev[i],
                                                                         position_ids)]
                v_all, offsets = None, {}
                if computing:
                    try:
                        v_all, offsets = forward(computing, steps, times_dev[i])
                    except Exception as exc:  # noqa: BLE001 - a shared forward failing ends every request in it
                        for job in active:
                            failed[job.slot] = exc
                            job.release()
                        return failed
                for job in list(active):
                    try:
                        if job.slot in offsets:
                            job.steps_computed += 1
                            velocities = self._guided(job, steps[job.slot], v_all, offsets[job.slot])
                            if job.cache is not None:
                                job.cache.store(velocities)
                        else:  # the step cache reuses the last computed step's guided velocities
                            velocities = job.cache.velocities
                        self._advance(job, velocities, i, total, times_dev[i], dts_dev[i], grid)
                    except Exception as exc:  # noqa: BLE001 - cancelled (callback raised) or failed: it leaves
                        failed[job.slot] = exc
                        active.remove(job)
                        job.release()
                if not active:
                    break
        finally:
            forward.release()
            denoise_s = time.perf_counter() - t1
            for job in jobs:
                job.timings["denoise_s"] = denoise_s
                job.timings["steps_computed"] = job.steps_computed
        return failed

    def _must_compute(self, job: _Request, i: int, step: _StepGuidance, t: torch.Tensor,
                      position_ids: torch.Tensor) -> bool:
        """Whether ``job`` runs the model at step ``i``: always without a step cache; with one, when its
        embedded input moved enough since the last computed step (see :mod:`worker.engine.step_cache`)."""
        if job.cache is None:
            return True
        signal = torch.stack([self.model.embed_latents(x, t, position_ids) for x in job.latents])
        return job.cache.should_compute(i, signal, step)

    @staticmethod
    def _guided(job: _Request, step: _StepGuidance, v_all: torch.Tensor, offset: int) -> list[torch.Tensor]:
        """The guided velocity of each image of ``job`` from its rows of ``v_all`` (starting at ``offset``)."""
        params = job.params
        n = len(step.branches)
        out = []
        for k in range(len(job.latents)):
            rows = v_all[offset + k * n:offset + (k + 1) * n]
            out.append(sampler.cfg_combine(
                rows[0],
                rows[step.branches.index(1)] if step.use_text else None,
                (rows[step.branches.index(2)] if step.run_img else rows[0]) if step.use_img else None,
                text_scale=step.text_scale, img_scale=step.img_scale,
                renorm_type=params.cfg_renorm_type, renorm_min=params.cfg_renorm_min,
            ))
        return out

    def _advance(self, job: _Request, velocities: list[torch.Tensor], i: int, total: int, t: torch.Tensor,
                 dt: torch.Tensor, grid: tuple[int, int]) -> None:
        """One Euler step of each image of ``job`` with its guided velocity; then the callback per image."""
        num_images = len(job.latents)
        for k, (x, v) in enumerate(zip(job.latents, velocities, strict=True)):
            x = x - v * dt
            job.latents[k] = x
            if job.callback is not None:
                preview = None
                if job.preview_every and ((i + 1) % job.preview_every == 0 or i + 1 == total):
                    # the model's current estimate of the clean latent (x_t = t * noise + (1 - t) * data)
                    preview = self.preview(x + v * (dt - t), grid)
                # the images advance together: step i of image k is number i * num_images + k + 1
                job.callback(i * num_images + k + 1, total * num_images, preview)

    # -------------------------------------------------------------------------------- 6. decode
    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype of the VAE's weights (latents are cast to it before decoding)."""
        return next(self.vae.parameters()).dtype

    def decode_latents(self, tokens: torch.Tensor, grid: tuple[int, int], *,
                       half_resolution: bool = False) -> Image.Image:
        """The RGB image of packed latent tokens ``(h * w, p * p * C)`` on a ``grid`` of ``(h, w)`` tokens.

        ``half_resolution``: average-pool the latent 2x2 first (a quarter of the decoder's work, half the
        pixels a side) when it is at least 4 latent pixels a side; previews use it.
        """
        latent = self.model.unpack_latent(tokens, grid).to(self.device, self.vae_dtype)
        if half_resolution and min(latent.shape[-2:]) >= 4:
            latent = torch.nn.functional.avg_pool2d(latent, 2)
        image = self.vae.decode(latent)
        pixels = ((image.float() * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).to(torch.uint8)
        return Image.fromarray(pixels.cpu().numpy())

    def decode_latents_batch(self, tokens: Sequence[torch.Tensor], grid: tuple[int, int]) -> list[Image.Image]:
        """The RGB images of several packed latents on one ``grid``, in one decoder call."""
        latent = torch.cat([self.model.unpack_latent(x, grid) for x in tokens]).to(self.device, self.vae_dtype)
        image = self.vae.decode(latent)
        pixels = ((image.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]

    def preview(self, tokens: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
        """A small image of a latent: decoded at half resolution, then shrunk to at most ``PREVIEW_SIZE``
        pixels a side."""
        preview = self.decode_latents(tokens, grid, half_resolution=True)
        preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
        return preview


# ================================================================================== compile


def check_compile_backend(device: torch.device) -> None:
    """``ValueError`` naming the cause when ``torch.compile`` (inductor) cannot compile for ``device``: no C++
    compiler on the CPU (``$CXX``, else inductor's ``g++``), no Triton on CUDA."""
    import shutil

    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means it cannot run
            raise ValueError(f"compile=True needs Triton for torch.compile on CUDA, and it is not importable "
                             f"({type(exc).__name__}: {exc}); install triton, or load with compile=False "
                             f"(ECHO4O_TORCH_COMPILE=0)") from None
        return
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise ValueError(f"compile=True needs a C++ compiler for torch.compile on the CPU (inductor), and "
                         f"{compiler!r} was not found (set CXX or install g++); or load with compile=False "
                         f"(ECHO4O_TORCH_COMPILE=0)")


# ================================================================================== batching

#: A request's keyword arguments (those of ``Echo4oPipeline.__call__``) and their defaults.
REQUEST_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(Echo4oPipeline.__call__).parameters.items() if name != "self"
}
#: What the requests of one ``generate_batch`` must share: the fields of :func:`batch_key`.
BATCH_KEY_FIELDS = ("height", "width", "num_steps", "timestep_shift")


def batch_key(**kwargs: Any) -> tuple[int, int, int, float]:
    """``(height, width, num_steps, timestep_shift)`` of a request given as ``__call__``'s keyword arguments,
    defaults resolved: requests with equal keys can run in one :meth:`Echo4oPipeline.generate_batch`.

    Needs no model: a multi-reference request without a size takes its last reference's size after the
    resize rule, worked out from the image's size (and EXIF orientation) without decoding its pixels. Only
    these four arguments are read; a value that cannot be read is a ``ValueError`` naming it (the other
    arguments are checked by the call).
    """
    unknown = sorted(set(kwargs) - set(REQUEST_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown request argument(s) {', '.join(unknown)}")
    a = {**REQUEST_DEFAULTS, **kwargs}
    height, width = a["height"], a["width"]
    if (height is None) != (width is None):
        raise ValueError("height and width must be given together (or neither, for the mode's default size)")
    if height is None:
        references = _as_image_list(a["images"])
        height, width = reference_output_size(references[-1]) if references else DEFAULT_SIZE
    for name, value in (("height", height), ("width", width), ("num_steps", a["num_steps"])):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer; got {value!r}")
    shift = _finite("timestep_shift", a["timestep_shift"])
    return int(height), int(width), int(a["num_steps"]), shift


def reference_output_size(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` an output takes from ``image`` as its last reference: the VAE resize rule applied
    to its size after EXIF orientation, as :func:`~worker.engine.image_processing.prepare_reference` does."""
    w, h = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - unreadable EXIF: exif_transpose leaves such an image as it is
        orientation = None
    if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees: the sides swap
        w, h = h, w
    new_w, new_h = resized_size(w, h, **VAE_RULE)
    return new_h, new_w


_EXIF_ORIENTATION = 0x0112


def _check_batch(jobs: list[_Request]) -> None:
    """``ValueError`` naming the first field two requests of a batch disagree on (see ``BATCH_KEY_FIELDS``)."""
    if not jobs:
        return
    first = jobs[0]
    for job in jobs[1:]:
        for name in BATCH_KEY_FIELDS:
            a, b = getattr(first.params, name), getattr(job.params, name)
            if a != b:
                raise ValueError(
                    f"requests of one batch must share {', '.join(BATCH_KEY_FIELDS)}: request {first.slot} has "
                    f"{name}={a} but request {job.slot} has {name}={b}; group requests by "
                    f"Echo4oPipeline.batch_key(**request)")


@dataclass(frozen=True)
class _StepGuidance:
    """What one request runs at one step: its scales and which context branches its forward needs."""

    text_scale: float
    img_scale: float
    use_text: bool
    use_img: bool
    run_img: bool
    branches: tuple[int, ...]


@dataclass
class _Request:
    """One request of a batch while it runs: its checked parameters, contexts, latents and timings."""

    slot: int
    params: GenerationParams
    callback: Callback | None
    preview_every: int
    prepared: list[PreparedReference]
    check_s: float = 0.0
    contexts: _Contexts | None = None
    latents: list[torch.Tensor] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cache: StepCache | None = None
    steps_computed: int = 0

    def guidance(self, t: torch.Tensor) -> _StepGuidance:
        """The scales at time ``t`` (1 outside the cfg interval) and the branches they need."""
        params = self.params
        if sampler.in_cfg_interval(t, params.cfg_interval):
            text_scale, img_scale = params.cfg_text_scale, params.cfg_img_scale
        else:
            text_scale, img_scale = 1.0, 1.0
        use_text, use_img = sampler.needed_branches(text_scale, img_scale)
        # without references the image-dropped context is the full one: its prediction is branch 0's
        run_img = use_img and self.contexts.image_dropped is not self.contexts.full
        branches = (0, *((1,) if use_text else ()), *((2,) if run_img else ()))
        return _StepGuidance(text_scale, img_scale, use_text, use_img, run_img, branches)

    def caches(self) -> tuple[KVCache, KVCache, KVCache]:
        c = self.contexts
        return c.full, c.text_dropped, c.image_dropped

    def release(self) -> None:
        if self.contexts is not None:
            self.contexts.release()


class _StepForward:
    """One step's packed forward over the rows (request, image, branch) of the running requests.

    The :class:`DenoiseLayout` (with its per-layer key/value buffers holding a copy of every row's context)
    is kept while the rows stay the same and rebuilt when they change (a request enters or leaves its cfg
    interval, or leaves the batch); only the current one is held. A lone image with its branches queries
    with one latent (the single-request path); several images query with a stack of latents.

    ``sequential`` (benchmarks only): one velocity call per row instead of one packed call, same results.
    """

    def __init__(self, pipe: Echo4oPipeline, num_tokens: int, frame: tuple[torch.Tensor, torch.Tensor],
                 position_ids: torch.Tensor):
        self.pipe = pipe
        self.num_tokens = num_tokens
        self.frame = frame
        self.position_ids = position_ids
        self.sequential = pipe._sequential_branches
        self._key: tuple | None = None
        self._layout: DenoiseLayout | None = None
        self._row_layouts: dict[tuple[int, int, int], DenoiseLayout] = {}

    def __call__(self, jobs: list[_Request], steps: dict[int, _StepGuidance],
                 t: torch.Tensor) -> tuple[torch.Tensor, dict[int, int]]:
        """``(v_all, offsets)``: the velocity of every row ``(rows, tokens, D)`` in float32, and where each
        request's rows start (its image ``k`` at ``offset + k * len(branches)``)."""
        rows: list[tuple[_Request, int, int]] = []
        offsets: dict[int, int] = {}
        for job in jobs:
            offsets[job.slot] = len(rows)
            rows.extend((job, k, b) for k in range(len(job.latents)) for b in steps[job.slot].branches)
        model, backend = self.pipe.model, self.pipe.attention_backend
        single = len(jobs) == 1 and len(jobs[0].latents) == 1
        x = jobs[0].latents[0] if single else torch.stack([x for job in jobs for x in job.latents])
        if self.sequential:
            return self._sequential(rows, x if not single else x[None], t), offsets
        key = tuple((job.slot, k, b) for job, k, b in rows)
        if key != self._key:
            self._layout = self._key = None  # let the old buffers go before the new ones are built
            sources = None
            if not single:
                index = {}
                for job in jobs:
                    for k in range(len(job.latents)):
                        index[(job.slot, k)] = len(index)
                sources = [index[(job.slot, k)] for job, k, _ in rows]
            self._layout = model.denoise_layout([job.caches()[b] for job, _, b in rows], self.num_tokens, backend,
                                                sources)
            self._key = key
        return model.velocity(x, t, self._layout, self.frame, self.position_ids).float(), offsets

    def _sequential(self, rows: list[tuple[_Request, int, int]], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model, backend = self.pipe.model, self.pipe.attention_backend
        out, index, seen = [], {}, set()
        for job, k, b in rows:
            index.setdefault((job.slot, k), len(index))
            key = (job.slot, k, b)
            seen.add(key)
            layout = self._row_layouts.get(key)
            if layout is None:
                layout = model.denoise_layout([job.caches()[b]], self.num_tokens, backend)
                self._row_layouts[key] = layout
            out.append(model.velocity(x[index[(job.slot, k)]], t, layout, self.frame, self.position_ids).float())
        for key in set(self._row_layouts) - seen:
            del self._row_layouts[key]
        return torch.cat(out)

    def release(self) -> None:
        self._layout = self._key = None
        self._row_layouts.clear()


# ================================================================================== helpers


def _as_image_list(images) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ValueError(f"images.{i} must be a PIL image; got {type(img).__name__}")
    return images


def _finite(name: str, value: Any, low: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if low is not None and number < low:
        raise ValueError(f"{name} must be >= {low}; got {value!r}")
    return number
