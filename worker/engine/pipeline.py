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
from echo4o.settings import DEFAULT_MODEL
from worker.engine import sampler
from worker.engine.attention import resolve_backend
from worker.engine.config import BagelConfig
from worker.engine.image_processing import PreparedReference, prepare_reference
from worker.engine.loading import (  # noqa: F401 - resolve_device/resolve_dtype/CheckpointError: re-exported
    CheckpointError,
    load_bagel,
    load_model_tokenizer,
    load_vae,
    plan_placement,
    read_config,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
)
from worker.engine.models.bagel import Bagel, DenoiseLayout, SpecialTokens
from worker.engine.models.qwen2_mot import KVCache
from worker.engine.models.vae import FluxVAE

log = get_logger(__name__)

#: ``params["mode"]`` of a call without reference images, and of one with them.
TEXT_TO_IMAGE = "text-to-image"
MULTI_REFERENCE = "multi-reference"
#: The job kind (the key of ``echo4o.jobs.MODE_DEFAULTS``) whose defaults each mode uses.
JOB_KIND_OF_MODE = {TEXT_TO_IMAGE: "generate", MULTI_REFERENCE: "multiref"}
PREVIEW_SIZE = 256

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
    ) -> Echo4oPipeline:
        """Load a checkpoint in the released layout from a local folder or a Hugging Face Hub id.

        ``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. ``dtype``:
        ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``. ``attention``:
        ``auto``, ``sdpa``, ``xformers`` or ``flash_attn``. ``device_map``: ``auto`` spreads the model over
        the visible GPUs (then the CPU) with accelerate only when it does not fit the chosen card; ``None``
        never does; a dict is an accelerate device map. ``token`` / ``cache_dir``: for the Hub download.

        A bad option is a ``ValueError`` naming it; missing, corrupt or mismatched files are a
        :class:`~worker.engine.loading.CheckpointError` naming the file and the fix.
        """
        t0 = time.perf_counter()
        path = resolve_checkpoint(path_or_hub_id, token=token, cache_dir=cache_dir)
        config = read_config(path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        backend = resolve_backend(attention, device, dtype)
        if device_map == "auto":
            device_map = plan_placement(config, device, dtype)
        elif device_map is not None and not isinstance(device_map, dict):
            raise ValueError(f"device_map must be 'auto', None or a dict; got {device_map!r}")
        model = load_bagel(path, config, device, dtype, device_map=device_map)
        vae = load_vae(path, config, device, dtype)
        tokenizer, special = load_model_tokenizer(path, config)
        pipe = cls(model, vae, tokenizer, special, attention_backend=backend, source=str(path_or_hub_id),
                   device=device)
        log.info("model loaded", extra={"model": str(path_or_hub_id), "path": str(path), "device": str(device),
                                        "dtype": str(dtype).removeprefix("torch."), "attention": backend,
                                        "placement": "accelerate" if device_map else "single-device",
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
        ``preview_every`` steps when > 0, else ``None``). An exception raised in the callback stops sampling
        and propagates; nothing of the call is kept. Any invalid argument is a ``ValueError`` naming it,
        raised before any work.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        # 1. check inputs, resolve the mode's defaults
        references = _as_image_list(images)
        params = self.check_inputs(prompt, references, height, width, num_steps, cfg_text_scale, cfg_img_scale,
                                   cfg_interval, timestep_shift, cfg_renorm_type, cfg_renorm_min, seed, num_images,
                                   output_type, callback, preview_every)
        prepared = [prepare_reference(img) for img in references]
        if params.height is None:
            h, w = prepared[-1].size_hw if prepared else DEFAULT_SIZE
            self._check_size(h, w, from_reference=bool(prepared))
            params = dataclasses.replace(params, height=int(h), width=int(w))
        generator = torch.Generator(device="cpu").manual_seed(params.seed)

        # 2. encode the contexts into KV caches (draws each reference's VAE posterior sample)
        contexts = self.encode_contexts(prompt, prepared, generator)
        timings["prefill_s"] = time.perf_counter() - t0
        try:
            grid = (params.height // self.config.latent_downsample, params.width // self.config.latent_downsample)
            # 3. initial latents: one noise draw per image, after the references' draws
            latents = [self.prepare_latents(grid, generator) for _ in range(num_images)]
            # 4. timesteps
            schedule = sampler.timesteps(params.num_steps, params.timestep_shift)
            # 5. denoise
            t1 = time.perf_counter()
            outputs = []
            for index, x in enumerate(latents):
                x = self.denoise(x, grid, contexts, schedule, params, callback, preview_every, index, num_images)
                outputs.append(x)
            timings["denoise_s"] = time.perf_counter() - t1
        finally:
            contexts.release()
        # 6. decode
        t2 = time.perf_counter()
        if output_type == "latent":
            results = [x.float().cpu() for x in outputs]
        else:
            results = [self.decode_latents(x, grid) for x in outputs]
        timings["decode_s"] = time.perf_counter() - t2
        steps = (params.num_steps - 1) * num_images
        timings["step_s"] = timings["denoise_s"] / steps if steps else 0.0
        timings["total_s"] = time.perf_counter() - t0
        return Echo4oPipelineOutput(images=results, params=params.to_dict(),
                                    timings={k: round(v, 4) for k, v in timings.items()})

    # -------------------------------------------------------------------------------- 1. inputs
    def check_inputs(self, prompt, references, height, width, num_steps, cfg_text_scale, cfg_img_scale,
                     cfg_interval, timestep_shift, cfg_renorm_type, cfg_renorm_min, seed, num_images, output_type,
                     callback, preview_every) -> GenerationParams:
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
    def denoise(self, x: torch.Tensor, grid: tuple[int, int], contexts: _Contexts, schedule: torch.Tensor,
                params: GenerationParams, callback: Callback | None, preview_every: int, index: int,
                num_images: int) -> torch.Tensor:
        """Euler steps of one image's latent ``x`` over ``schedule``, with three-branch guidance inside the cfg
        interval (``params``); calls ``callback`` after each step. Returns the final latent tokens."""
        model = self.model
        times, dts = sampler.step_sizes(schedule)  # on the CPU: the interval test needs no device sync
        times_dev, dts_dev = times.to(self.device), dts.to(self.device)
        total = len(times)
        position_ids = model.latent_position_ids(grid)
        frame = (model.embed_ids([self.special.start_of_image]), model.embed_ids([self.special.end_of_image]))
        caches = (contexts.full, contexts.text_dropped, contexts.image_dropped)
        for i in range(total):
            if sampler.in_cfg_interval(times[i], params.cfg_interval):
                text_scale, img_scale = params.cfg_text_scale, params.cfg_img_scale
            else:
                text_scale, img_scale = 1.0, 1.0
            use_text, use_img = sampler.needed_branches(text_scale, img_scale)
            # without references the image-dropped context is the full one: its prediction is branch 0's
            run_img = use_img and contexts.image_dropped is not contexts.full
            branches = (0, *((1,) if use_text else ()), *((2,) if run_img else ()))
            layout = contexts.layouts.get(branches)
            if layout is None:
                layout = model.denoise_layout([caches[b] for b in branches], grid[0] * grid[1],
                                              self.attention_backend)
                contexts.layouts[branches] = layout
            v_all = model.velocity(x, times_dev[i], layout, frame, position_ids).float()
            v = sampler.cfg_combine(
                v_all[0],
                v_all[branches.index(1)] if use_text else None,
                (v_all[branches.index(2)] if run_img else v_all[0]) if use_img else None,
                text_scale=text_scale, img_scale=img_scale,
                renorm_type=params.cfg_renorm_type, renorm_min=params.cfg_renorm_min,
            )
            x = x - v * dts_dev[i]
            if callback is not None:
                preview = None
                if preview_every and ((i + 1) % preview_every == 0 or i + 1 == total):
                    # the model's current estimate of the clean latent (x_t = t * noise + (1 - t) * data)
                    preview = self.preview(x + v * (dts_dev[i] - times_dev[i]), grid)
                step = index * total + i + 1 if num_images > 1 else i + 1
                callback(step, total * num_images, preview)
        return x

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

    def preview(self, tokens: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
        """A small image of a latent: decoded at half resolution, then shrunk to at most ``PREVIEW_SIZE``
        pixels a side."""
        preview = self.decode_latents(tokens, grid, half_resolution=True)
        preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
        return preview


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
