"""Time the engine: model load, context prefill, time per denoising step and per image, peak memory.

    python benchmarks/engine_bench.py                                   # tiny random model, CPU-sized run
    python benchmarks/engine_bench.py --model full --device cuda --dtype bfloat16 --size 1024 --steps 50
    python benchmarks/engine_bench.py --model full --layers 2 --size 256 --steps 4 --device cpu   # real width,
                                                                                                # fewer layers
    python benchmarks/engine_bench.py --model model_weights/echo4o/main --refs 2 --json out.json   # real weights

``--model``: ``tiny`` (written to a temp folder, loaded through ``Echo4oPipeline.from_pretrained``), ``full``
(the released 7B shape with random weights, no download: built on the ``meta`` device, materialised in
``--dtype`` on ``--device``; ``--layers N`` keeps the real width with N decoder layers, for machines with less
memory), or a checkpoint folder / Hub id. ``--refs N`` adds N synthetic reference images (multi-reference
mode). Each configuration is warmed up once (one step), then timed ``--repeats`` times.

Before allocating anything, ``--model full`` checks that the weights (plus 2 GiB and 10 %) fit the free memory of
the device (CUDA free memory, or available RAM) and otherwise stops, naming the largest ``--layers`` that fits.
Progress goes to stderr as the run goes (a full-width step on a CPU takes tens of seconds, and the defaults of
1024 px and 50 steps take hours there: pass a small ``--size`` and ``--steps``); the table goes to stdout.

Per-step times come from the step callback (with a CUDA synchronisation, so they are real); steps inside the
cfg interval run 2-3 guidance branches, outside it one, so the minimum and maximum are shown beside the mean.
``prefill_s`` is timed apart, by building the contexts alone; ``image_s`` is a whole call per image.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from echo4o.jobs import DEFAULT_SIZE, DEFAULT_STEPS

# The released Echo-4o / BAGEL-7B-MoT shape (llm_config.json, vit_config.json of the checkpoint).
FULL_LLM = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 152064,
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
    "rope_scaling": None, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer",
}
FULL_VIT = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 980, "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
}
# A CPU-sized run of the tiny model (the job defaults are for real weights).
TINY_STEPS = 10
TINY_SIDE = 256
PROMPT = "A red panda sleeping on a wooden bed under a warm blanket, soft morning light through the window."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | full | a checkpoint folder or Hub id (default: tiny)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    ap.add_argument("--attention", default="auto", help="auto | sdpa | xformers | flash_attn")
    ap.add_argument("--steps", type=int, default=None, help="schedule points (steps - 1 denoising steps); "
                                                            f"default {DEFAULT_STEPS} (tiny: {TINY_STEPS})")
    ap.add_argument("--size", default=None, help=f"H or HxW in pixels, multiples of 16; default "
                                                 f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]} (tiny: {TINY_SIDE})")
    ap.add_argument("--refs", type=int, default=0, help="synthetic reference images (multi-reference mode)")
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="full model only: decoder layers to build (real width)")
    ap.add_argument("--vit-layers", type=int, default=None, help="full model only: ViT layers to build")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median reported)")
    ap.add_argument("--cfg-text-scale", type=float, default=None, help="default: the mode's (echo4o.jobs)")
    ap.add_argument("--cfg-img-scale", type=float, default=None, help="default: the mode's (echo4o.jobs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 gives steadier "
                                                             "figures on a shared machine")
    ap.add_argument("--batch-requests", type=int, default=8, help="requests of the cross-request batching "
                                                                  "measurement (0: skip it)")
    ap.add_argument("--step-cache", type=float, default=None, help="step-cache threshold measured (default: "
                                                                   "worker.engine.step_cache.RECOMMENDED_THRESHOLD)")
    ap.add_argument("--compile", action="store_true", help="also time the step forward compiled (torch.compile) "
                                                           "against uncompiled: compile_speedup")
    ap.add_argument("--no-extras", action="store_true", help="skip the batching / caching / compile comparisons")
    return ap.parse_args(argv)


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise SystemExit(f"--size must be H or HxW (e.g. 1024 or 768x1024); got {text!r}") from None
    return h, w


# ------------------------------------------------------------------------------------------------ models


def load_tiny(args: argparse.Namespace, workdir: Path):
    from worker.engine.pipeline import Echo4oPipeline
    from worker.engine.tiny import write_tiny_model

    path = write_tiny_model(workdir / "tiny", seed=0)
    return Echo4oPipeline.from_pretrained(str(path), device=args.device, dtype=args.dtype, attention=args.attention,
                                          device_map=None)


def load_path(args: argparse.Namespace):
    from worker.engine.pipeline import Echo4oPipeline

    return Echo4oPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, attention=args.attention)


def full_config(args: argparse.Namespace):
    from worker.engine.config import BagelConfig, VAEConfig, llm_config_from_dict, vit_config_from_dict

    llm = dict(FULL_LLM)
    vit = dict(FULL_VIT)
    if args.layers:
        llm["num_hidden_layers"] = llm["max_window_layers"] = args.layers
    if args.vit_layers:
        vit["num_hidden_layers"] = args.vit_layers + 1  # the config counts one layer more than is built
    return BagelConfig(llm=llm_config_from_dict(llm), vit=vit_config_from_dict(vit), vae=VAEConfig())


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes free for new tensors on ``device``, and what was measured."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    import psutil

    return psutil.virtual_memory().available, "available RAM"


def check_fits(model: torch.nn.Module, vae: torch.nn.Module, config, args: argparse.Namespace,
               device: torch.device, dtype: torch.dtype) -> int:
    """Raise ``ValueError`` before anything is allocated when the weights (plus working room) will not fit
    ``device``; returns the weight bytes. Working room: 2 GiB plus 10 % of the weights."""
    size = torch.tensor([], dtype=dtype).element_size()
    weights = sum(p.numel() for m in (model, vae) for p in m.parameters()) * size
    need = weights + 2 * 2**30 + weights // 10
    free, what = available_memory(device)
    if need <= free:
        return weights
    layers = config.llm.num_hidden_layers
    per_layer = sum(p.numel() for p in model.language_model.model.layers[0].parameters()) * size
    fixed = weights - layers * per_layer
    fit = int((free - 2 * 2**30 - (fixed * 11) // 10) // ((per_layer * 11) // 10))
    hint = (f"use --layers {fit} (the most that fit; each decoder layer is {per_layer / 2**30:.2f} GiB in "
            f"{str(dtype).removeprefix('torch.')})" if fit >= 1 else "even one decoder layer does not fit")
    if dtype == torch.float32:
        hint += ", or --dtype bfloat16 (half the memory; slow on CPUs without bf16 units)"
    if device.type == "cuda":
        hint += ", or a card with more memory"
    raise ValueError(
        f"--model full with {layers} decoder layers needs about {need / 2**30:.1f} GiB on {device} "
        f"({weights / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} weights plus working room) but only "
        f"{free / 2**30:.1f} GiB is {what}: {hint}")


def build_full_random(args: argparse.Namespace, workdir: Path):
    """The released shape with random weights: built on ``meta``, then each module's tensors are allocated
    directly in ``--dtype`` on ``--device`` and filled there (no float32 or CPU copy of the model)."""
    from worker.engine.attention import resolve_backend
    from worker.engine.loading import resolve_device, resolve_dtype
    from worker.engine.models.bagel import Bagel, SpecialTokens
    from worker.engine.models.vae import FluxVAE
    from worker.engine.pipeline import Echo4oPipeline
    from worker.engine.tokenizer import build_tiny_tokenizer, load_tokenizer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    backend = resolve_backend(args.attention, device, dtype)
    config = full_config(args)

    with torch.device("meta"):
        model = Bagel(config)
        vae = FluxVAE(config.vae)
    weights = check_fits(model, vae, config, args, device, dtype)
    progress(f"materialising {config.llm.num_hidden_layers} decoder layers, {weights / 2**30:.1f} GiB of "
             f"{str(dtype).removeprefix('torch.')} weights on {device}")
    generator = torch.Generator(device=device).manual_seed(0)
    model = _materialise(model, device, dtype, generator)
    model.reset_position_tables()
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=config.llm).to(device)
    vae = _materialise(vae, device, dtype, generator)

    # a small tokenizer stands in for Qwen2's: the prompt's ids only need to fall inside the vocabulary
    build_tiny_tokenizer(workdir / "tok")
    tokenizer, ids = load_tokenizer(workdir / "tok")
    special = SpecialTokens(bos=ids["bos_token_id"], eos=ids["eos_token_id"], start_of_image=ids["start_of_image"],
                            end_of_image=ids["end_of_image"])
    label = "full-random" + (f" ({args.layers} layers)" if args.layers else "")
    return Echo4oPipeline(model.eval().requires_grad_(False), vae.eval().requires_grad_(False), tokenizer, special,
                          attention_backend=backend, source=label, device=device)


def _materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator) -> torch.nn.Module:
    """Allocate ``module``'s meta tensors on ``device`` in ``dtype`` and fill them in place: matrices
    N(0, 1/fan_in), norm scales 1, biases 0 (activations stay O(1), so bf16 runs meet no overflow)."""
    module = module.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("pos_embed"):
                continue  # fixed sin-cos tables, filled by reset_position_tables
            if param.dim() == 1:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
    return module


def progress(message: str) -> None:
    """One line on stderr as a long run goes (full-size builds and CPU steps can take minutes)."""
    print(f"[engine_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def references(n: int) -> list:
    from PIL import Image

    # sizes cycle through common aspect ratios; content is a smooth gradient (cheap and deterministic)
    sizes = [(1024, 1024), (1024, 768), (768, 1024)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        out.append(img)
    return out


def time_prefill(pipe, refs: list, device: torch.device) -> float:
    from worker.engine.image_processing import prepare_reference

    prepared = [prepare_reference(img) for img in refs]
    generator = torch.Generator(device="cpu").manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    contexts = pipe.encode_contexts(PROMPT, prepared, generator)
    sync(device)
    elapsed = time.perf_counter() - t0
    contexts.release()
    return elapsed


def timed_call(pipe, args: argparse.Namespace, refs: list, size: tuple[int, int] | None, steps: int,
               device: torch.device, log_steps: bool = False) -> dict[str, Any]:
    marks: list[float] = []

    def on_step(step: int, total: int, preview: Any) -> None:
        sync(device)
        marks.append(time.perf_counter())
        if log_steps:
            progress(f"step {step}/{total}")

    kwargs: dict[str, Any] = {}
    if size is not None and not refs:
        kwargs["height"], kwargs["width"] = size
    sync(device)
    t0 = time.perf_counter()
    out = pipe(PROMPT, images=refs or None, num_steps=steps, cfg_text_scale=args.cfg_text_scale,
               cfg_img_scale=args.cfg_img_scale, seed=args.seed, num_images=args.num_images, callback=on_step, **kwargs)
    sync(device)
    total = time.perf_counter() - t0
    step_times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"total_s": total, "step_times": step_times, "timings": out.timings, "params": out.params}


def _call_kwargs(args: argparse.Namespace, refs: list, size: tuple[int, int] | None, steps: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"images": refs or None, "num_steps": steps, "cfg_text_scale": args.cfg_text_scale,
                              "cfg_img_scale": args.cfg_img_scale}
    if size is not None and not refs:
        kwargs["height"], kwargs["width"] = size
    return kwargs


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_cfg_batching(pipe, args: argparse.Namespace, refs: list, size, steps: int,
                         device: torch.device) -> dict[str, Any]:
    """Per-step time of the guidance branches run one velocity call each (sequential) over one packed call
    (batched), side by side in alternation, the cfg interval widened to every step; and their outputs' gap."""
    kwargs = {**_call_kwargs(args, refs, size, steps), "cfg_interval": (0.0, 1.0), "seed": args.seed,
              "output_type": "latent"}
    step_s: dict[bool, list[float]] = {True: [], False: []}
    latents: dict[bool, torch.Tensor] = {}
    try:
        for _ in range(max(2, args.repeats)):
            for sequential in (True, False):
                pipe._sequential_branches = sequential
                sync(device)
                out = pipe(PROMPT, **kwargs)
                sync(device)
                step_s[sequential].append(out.timings["denoise_s"] / (steps - 1))
                latents[sequential] = out.images[0]
    finally:
        pipe._sequential_branches = False
    seq, bat = statistics.median(step_s[True]), statistics.median(step_s[False])
    params = pipe.check_inputs(PROMPT, refs, None, None, steps, args.cfg_text_scale, args.cfg_img_scale, None, 3.0,
                               None, 0.0, 0, 1, "pil", None, 0)
    text, img = params.cfg_text_scale > 1, params.cfg_img_scale > 1
    branches = 1 + text + (text and img and bool(refs))  # no image-dropped branch without references
    return {
        "cfg_branches": int(branches),
        "cfg_sequential_step_s": round(seq, 4),
        "cfg_batched_step_s": round(bat, 4),
        "cfg_batched_speedup": round(seq / bat, 3),
        "cfg_batched_max_abs_diff": float((latents[True] - latents[False]).abs().max()),
    }


def measure_request_batching(pipe, args: argparse.Namespace, refs: list, size, steps: int,
                             device: torch.device) -> dict[str, Any]:
    """Images per second of ``--batch-requests`` requests (differing prompts and seeds) run as one
    ``generate_batch`` over the same requests one call at a time, whole calls (prefill, sampling, decode)."""
    n = args.batch_requests
    base = _call_kwargs(args, refs, size, steps)
    requests = [{**base, "prompt": f"{PROMPT} ({i})", "seed": args.seed + i} for i in range(n)]
    repeats = max(1, args.repeats)
    one = _median_time(lambda: [pipe(**r) for r in requests], repeats, device)
    results = []
    batched = _median_time(lambda: results.append(pipe.generate_batch(requests)), repeats, device)
    failed = [r for r in results[-1] if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    return {
        f"request_batching_images_per_s_sequential_{n}": round(n / one, 3),
        f"request_batching_images_per_s_batched_{n}": round(n / batched, 3),
        f"request_batching_speedup_{n}": round(one / batched, 3),
    }


def measure_step_cache(pipe, args: argparse.Namespace, refs: list, size, steps: int,
                       device: torch.device) -> dict[str, Any]:
    """Sampling time without and with the step cache at ``--step-cache`` (default: the recommended threshold),
    side by side in alternation; the steps it computed, and how far its latent and its pixels land from the
    uncached ones (max abs difference; pixels in 0..255)."""
    import numpy as np

    from worker.engine.step_cache import RECOMMENDED_THRESHOLD

    threshold = RECOMMENDED_THRESHOLD if args.step_cache is None else args.step_cache
    kwargs = {**_call_kwargs(args, refs, size, steps), "seed": args.seed, "output_type": "latent"}
    denoise: dict[bool, list[float]] = {False: [], True: []}
    outs = {}
    for _ in range(max(2, args.repeats)):
        for cached in (False, True):
            sync(device)
            out = pipe(PROMPT, step_cache=threshold if cached else 0, **kwargs)
            sync(device)
            denoise[cached].append(out.timings["denoise_s"])
            outs[cached] = out
    grid = (outs[False].params["height"] // pipe.config.latent_downsample,
            outs[False].params["width"] // pipe.config.latent_downsample)
    pixels = [np.asarray(pipe.decode_latents(outs[c].images[0], grid)).astype(np.int16) for c in (False, True)]
    plain, cached = statistics.median(denoise[False]), statistics.median(denoise[True])
    return {
        "step_cache_threshold": threshold,
        "step_cache_speedup": round(plain / cached, 3),
        "step_cache_steps_computed": int(outs[True].timings["steps_computed"]),
        "step_cache_steps_total": steps - 1,
        "step_cache_max_abs_diff": round(float((outs[True].images[0] - outs[False].images[0]).abs().max()), 5),
        "step_cache_pixel_max_abs_diff": int(np.abs(pixels[1] - pixels[0]).max()),
        "step_cache_pixel_mean_abs_diff": round(float(np.abs(pixels[1] - pixels[0]).mean()), 3),
    }


def measure_compile(pipe, args: argparse.Namespace, refs: list, size, steps: int,
                    device: torch.device) -> dict[str, Any]:
    """Per-step sampling time with the decoder stack of the step forward uncompiled and compiled
    (``torch.compile``, as ``from_pretrained(compile=True)`` sets it), after a warm-up call that compiles."""
    from worker.engine.pipeline import check_compile_backend

    check_compile_backend(device)
    kwargs = {**_call_kwargs(args, refs, size, steps), "seed": args.seed, "output_type": "latent", "step_cache": 0}
    model = pipe.model
    t0 = time.perf_counter()
    model._step_llm = torch.compile(model.llm.forward)
    try:
        pipe(PROMPT, **kwargs)  # compiles (each new shape of the packed query compiles once)
        warmup = time.perf_counter() - t0
        step_s: dict[bool, list[float]] = {False: [], True: []}
        compiled = model._step_llm
        outs = {}
        for _ in range(max(2, args.repeats)):
            for on in (False, True):
                model._step_llm = compiled if on else None
                sync(device)
                out = pipe(PROMPT, **kwargs)
                sync(device)
                step_s[on].append(out.timings["denoise_s"] / (steps - 1))
                outs[on] = out.images[0]
    finally:
        model._step_llm = None
    off, on = statistics.median(step_s[False]), statistics.median(step_s[True])
    return {"compile_speedup": round(off / on, 3), "compile_step_s": round(on, 4), "compile_warmup_s": round(warmup, 1),
            "compile_max_abs_diff": float((outs[True] - outs[False]).abs().max())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from echo4o.logging import setup_logging

    setup_logging("WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.model == "tiny"
    steps = args.steps or (TINY_STEPS if tiny else DEFAULT_STEPS)
    size = parse_size(args.size) if args.size else ((TINY_SIDE, TINY_SIDE) if tiny else DEFAULT_SIZE)
    import worker.engine.pipeline  # noqa: F401 - imported before the load timer starts
    import worker.engine.tiny  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="echo4o-bench-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        if tiny:
            pipe = load_tiny(args, workdir)
        elif args.model == "full":
            pipe = build_full_random(args, workdir)
        else:
            pipe = load_path(args)
        device = pipe.device
        sync(device)
        load_s = time.perf_counter() - t0
        weights_gb = sum(p.numel() * p.element_size() for p in pipe.model.parameters()) / 2**30
        weights_gb += sum(p.numel() * p.element_size() for p in pipe.vae.parameters()) / 2**30
        refs = references(args.refs)

        progress(f"loaded in {load_s:.1f} s; warm-up call (one step and a decode)")
        warm = timed_call(pipe, args, refs, size, 2, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_call = warm["total_s"] + (steps - 2) * args.num_images * max(warm["step_times"] or [0.0])
        progress(f"warm-up took {warm['total_s']:.1f} s; timing {args.repeats} prefill(s) and {args.repeats} "
                 f"call(s) of {steps - 1} steps (about {per_call * args.repeats / 60:.1f} min or less)")
        prefill = [time_prefill(pipe, refs, device) for _ in range(args.repeats)]
        runs = [timed_call(pipe, args, refs, size, steps, device, log_steps=not tiny) for _ in range(args.repeats)]
        extras: dict[str, Any] = {}
        if not args.no_extras:
            progress("guidance branches: sequential vs one packed call")
            extras.update(measure_cfg_batching(pipe, args, refs, size, steps, device))
            if args.batch_requests > 0:
                progress(f"{args.batch_requests} requests: one at a time vs one batch")
                extras.update(measure_request_batching(pipe, args, refs, size, steps, device))
            progress("step cache: off vs on")
            extras.update(measure_step_cache(pipe, args, refs, size, steps, device))
        if args.compile:
            progress("torch.compile: off vs on (the warm-up compiles: minutes on a small CPU)")
            extras.update(measure_compile(pipe, args, refs, size, steps, device))

    params = runs[-1]["params"]
    all_steps = [s for r in runs for s in r["step_times"]]
    denoise = statistics.median(r["timings"].get("denoise_s", 0.0) for r in runs)
    n_steps = (steps - 1) * args.num_images
    return {
        "model": args.model if not tiny else "tiny",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "attention": pipe.attention_backend,
        "layers": pipe.config.llm.num_hidden_layers,
        "height": params["height"], "width": params["width"], "references": args.refs,
        "num_images": args.num_images, "steps": steps - 1,
        "load_s": round(load_s, 3),
        "weights_gb": round(weights_gb, 3),
        "prefill_s": round(statistics.median(prefill), 4),
        "step_s": round(denoise / n_steps, 4) if n_steps else 0.0,
        "step_s_min": round(min(all_steps), 4) if all_steps else None,
        "step_s_max": round(max(all_steps), 4) if all_steps else None,
        "decode_s": round(statistics.median(r["timings"].get("decode_s", 0.0) for r in runs) / args.num_images, 4),
        "image_s": round(statistics.median(r["total_s"] for r in runs) / args.num_images, 3),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        **extras,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def print_report(r: dict[str, Any]) -> None:
    print(f"engine benchmark: {r['model']} on {r['device']} ({r['device_name']}), {r['dtype']}, attention "
          f"{r['attention']}, {r['layers']} LLM layers")
    print(f"  {r['width']}x{r['height']}, {r['references']} reference(s), {r['steps']} steps, "
          f"{r['num_images']} image(s), {r['repeats']} timed run(s) after a warm-up")
    rows = [
        ("load", f"{r['load_s']:.2f} s", f"weights {r['weights_gb']:.2f} GiB"),
        ("prefill", f"{r['prefill_s'] * 1000:.1f} ms", "context into the KV caches"),
        ("step", f"{r['step_s'] * 1000:.1f} ms", f"min {r['step_s_min'] * 1000:.1f} / max {r['step_s_max'] * 1000:.1f}"
         if r["step_s_min"] is not None else ""),
        ("decode", f"{r['decode_s'] * 1000:.1f} ms", "VAE decode per image"),
        ("image", f"{r['image_s']:.3f} s", "whole call per image"),
        ("peak mem", f"{r['peak_memory_gb']:.2f} GiB", r["peak_memory_kind"]),
    ]
    for name, value, note in rows:
        print(f"  {name:<9}{value:>12}   {note}")
    if "cfg_batched_speedup" in r:
        print(f"  cfg      {r['cfg_batched_speedup']:>11.2f}x   {r['cfg_branches']} guidance branches per step: "
              f"{r['cfg_sequential_step_s'] * 1000:.1f} ms sequential, {r['cfg_batched_step_s'] * 1000:.1f} ms "
              f"packed (max abs diff {r['cfg_batched_max_abs_diff']:.1e})")
    if "step_cache_speedup" in r:
        print(f"  cache    {r['step_cache_speedup']:>11.2f}x   threshold {r['step_cache_threshold']}: "
              f"{r['step_cache_steps_computed']}/{r['step_cache_steps_total']} steps computed; max abs diff latent "
              f"{r['step_cache_max_abs_diff']:.3g}, pixels {r['step_cache_pixel_max_abs_diff']} "
              f"(mean {r['step_cache_pixel_mean_abs_diff']})")
    if "compile_speedup" in r:
        print(f"  compile  {r['compile_speedup']:>11.2f}x   {r['compile_step_s'] * 1000:.1f} ms a step compiled "
              f"(warm-up {r['compile_warmup_s']} s; max abs diff {r['compile_max_abs_diff']:.1e})")
    for key, value in r.items():
        if key.startswith("request_batching_speedup_"):
            n = key.rsplit("_", 1)[1]
            print(f"  batch {n:<3}{value:>11.2f}x   images/s: {r[f'request_batching_images_per_s_batched_{n}']:.2f} "
                  f"batched vs {r[f'request_batching_images_per_s_sequential_{n}']:.2f} one at a time")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"  wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
