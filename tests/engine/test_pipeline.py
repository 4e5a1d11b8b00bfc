"""Echo4oPipeline on the tiny model: the public call, seeds, references, size rules, callback and cancel."""

from __future__ import annotations

import dataclasses
import gc
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from echo4o.jobs import DEFAULT_STEPS, MAX_NUM_IMAGES, MAX_STEPS, MODE_DEFAULTS, SEED_MAX
from worker.engine import Echo4oPipeline
from worker.engine.pipeline import MULTI_REFERENCE, TEXT_TO_IMAGE, GenerationParams

FAST = {"height": 32, "width": 48, "num_steps": 3}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Echo4oPipeline.from_pretrained(tiny_model, device="cpu", attention="auto")


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bytes(img: Image.Image) -> bytes:
    return np.asarray(img).tobytes()


def test_text_to_image_returns_a_pil_image_and_every_parameter(pipe):
    out = pipe("a red panda on a bed", seed=1, **FAST)
    assert len(out.images) == 1
    img = out.images[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (48, 32)
    p = out.params
    assert p["mode"] == TEXT_TO_IMAGE
    assert (p["height"], p["width"], p["num_steps"], p["seed"]) == (32, 48, 3, 1)
    generate = MODE_DEFAULTS["generate"]  # text scale 4, image scale 1, interval [0.4, 1], global renorm
    assert (p["cfg_text_scale"], p["cfg_img_scale"]) == (generate.cfg_text_scale, generate.cfg_img_scale)
    assert p["cfg_interval"] == list(generate.cfg_interval) and p["cfg_renorm_type"] == generate.cfg_renorm_type
    assert p["attention"] == pipe.attention_backend == "sdpa"
    assert p["dtype"] == "float32" and p["device"] == "cpu"
    assert set(out.timings) >= {"prefill_s", "denoise_s", "decode_s", "step_s"}
    assert json.loads(json.dumps(out.params)) == p  # plain JSON values: they go into PNG text chunks


def test_check_inputs_gives_frozen_params_with_the_modes_defaults(pipe):
    """Left out, guidance takes echo4o.jobs' defaults of the mode; the result is frozen, its size unresolved."""
    params = pipe.check_inputs("a cat", [], None, None, DEFAULT_STEPS, None, None, None, 3.0, None, 0.0, 5, 1,
                               "pil", None, 0)
    generate = MODE_DEFAULTS["generate"]
    assert isinstance(params, GenerationParams)
    assert (params.mode, params.height, params.width, params.num_steps) == (TEXT_TO_IMAGE, None, None, DEFAULT_STEPS)
    assert (params.cfg_text_scale, params.cfg_img_scale, params.cfg_interval, params.cfg_renorm_type) == (
        generate.cfg_text_scale, generate.cfg_img_scale, generate.cfg_interval, generate.cfg_renorm_type)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 6  # type: ignore[misc]
    data = params.to_dict()
    assert data["cfg_interval"] == list(generate.cfg_interval) and data["seed"] == 5
    assert list(data) == [f.name for f in dataclasses.fields(GenerationParams)]


def test_output_params_are_the_resolved_params_as_a_dict(pipe):
    """The call fills in the default size and keeps every other resolved value: out.params is exactly
    GenerationParams.to_dict() with the size applied."""
    out = pipe("a cat", seed=2, num_steps=2, output_type="latent", cfg_text_scale=1.0)
    expected = pipe.check_inputs("a cat", [], None, None, 2, 1.0, None, None, 3.0, None, 0.0, 2, 1, "latent",
                                 None, 0)
    assert out.params == dataclasses.replace(expected, height=1024, width=1024).to_dict()


def test_same_seed_same_bytes_and_different_seeds_differ(pipe):
    a = pipe("a cat", seed=7, **FAST).images[0]
    b = pipe("a cat", seed=7, **FAST).images[0]
    c = pipe("a cat", seed=8, **FAST).images[0]
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(c)


def test_the_prompt_matters(pipe):
    a = pipe("a cat", seed=3, output_type="latent", **FAST).images[0]
    b = pipe("a dog in the snow", seed=3, output_type="latent", **FAST).images[0]
    assert not torch.equal(a, b)


def test_latent_output_is_the_packed_token_grid(pipe):
    out = pipe("a cat", seed=0, output_type="latent", **FAST)
    latent = out.images[0]
    assert latent.dtype == torch.float32 and latent.device.type == "cpu"
    assert latent.shape == (2 * 3, 64)  # (32/16) x (48/16) tokens of 2x2x16 values
    assert torch.isfinite(latent).all()


def test_several_images_continue_one_random_stream(pipe):
    one = pipe("a cat", seed=5, output_type="latent", **FAST).images
    two = pipe("a cat", seed=5, output_type="latent", num_images=2, **FAST).images
    assert len(two) == 2
    # image 0 draws first, as a single image does; the images run as one packed batch, so the larger matrix
    # products may round differently in the last bits
    assert (one[0] - two[0]).abs().max() < 1e-5
    assert not torch.equal(two[0], two[1])


@pytest.mark.parametrize("count", [1, 3])
def test_references_condition_the_image_and_set_its_size(pipe, count):
    refs = [_image(32, 32, seed=i) for i in range(count - 1)] + [_image(40, 32, seed=count)]
    out = pipe("put them together", images=refs, seed=2, num_steps=2, output_type="latent")
    p = out.params
    assert p["mode"] == MULTI_REFERENCE and p["num_references"] == count
    multiref = MODE_DEFAULTS["multiref"]
    assert (p["cfg_text_scale"], p["cfg_img_scale"], p["cfg_interval"], p["cfg_renorm_type"]) == (
        multiref.cfg_text_scale, multiref.cfg_img_scale, list(multiref.cfg_interval), multiref.cfg_renorm_type)
    # the last reference, resized as the reference VAE transform does (shorter side to 512, multiples of 16)
    assert (p["height"], p["width"]) == (512, 640)
    assert out.images[0].shape == (32 * 40, 64)


def test_references_with_an_explicit_size_and_their_content_matters(pipe):
    a = pipe("edit", images=[_image(40, 32, seed=0)], height=32, width=32, num_steps=2, seed=4)
    b = pipe("edit", images=[_image(40, 32, seed=1)], height=32, width=32, num_steps=2, seed=4)
    assert a.images[0].size == (32, 32) and a.params["mode"] == MULTI_REFERENCE
    assert _bytes(a.images[0]) != _bytes(b.images[0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"height": 40, "width": 32}, "height"),
        ({"height": 32, "width": 1040}, "width"),
        ({"height": 0, "width": 32}, "height"),
        ({"width": None}, "height and width"),
        ({"num_steps": 1}, "num_steps"),
        ({"num_steps": MAX_STEPS + 1}, f"num_steps must be an integer in 2..{MAX_STEPS}"),
        ({"cfg_text_scale": float("nan")}, "cfg_text_scale"),
        ({"cfg_img_scale": -1}, "cfg_img_scale"),
        ({"cfg_interval": (0.8, 0.2)}, "cfg_interval"),
        ({"cfg_interval": (0.0, 1.5)}, "cfg_interval"),
        ({"timestep_shift": 0}, "timestep_shift"),
        ({"cfg_renorm_type": "layer"}, "cfg_renorm_type"),
        ({"seed": -1}, "seed"),
        ({"seed": SEED_MAX + 1}, f"seed must be an integer in 0..{SEED_MAX}"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": MAX_NUM_IMAGES + 1}, f"num_images must be an integer in 1..{MAX_NUM_IMAGES}"),
        ({"output_type": "np"}, "output_type"),
        ({"images": ["not an image"]}, "images.0"),
        ({"preview_every": -2}, "preview_every"),
    ],
)
def test_invalid_arguments_are_value_errors_naming_them(pipe, kwargs, name):
    args = {"height": 32, "width": 32, "num_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe("a cat", **args)


def test_empty_prompt_is_refused(pipe):
    with pytest.raises(ValueError, match="prompt"):
        pipe("   ", **FAST)


def test_callback_runs_once_per_step_with_previews(pipe):
    calls = []
    pipe("a cat", seed=0, height=32, width=32, num_steps=5, preview_every=2,
         callback=lambda step, total, preview: calls.append((step, total, preview)))
    assert [(s, t) for s, t, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    previews = [p for _, _, p in calls]
    assert previews[0] is None and previews[2] is None
    assert isinstance(previews[1], Image.Image) and isinstance(previews[3], Image.Image)


class _Cancel(Exception):
    pass


def test_raising_in_the_callback_cancels_cleanly(pipe, monkeypatch):
    clean = pipe("a cat", seed=11, output_type="latent", **FAST).images[0]
    threads_before = set(threading.enumerate())
    seen, contexts = [], []
    encode = pipe.encode_contexts

    def recording_encode(*args, **kwargs):
        contexts.append(encode(*args, **kwargs))
        return contexts[-1]

    def cancel(step, total, preview):
        seen.append(step)
        if step == 1:
            raise _Cancel

    monkeypatch.setattr(pipe, "encode_contexts", recording_encode)
    with pytest.raises(_Cancel):
        pipe("a cat", seed=11, callback=cancel, **FAST)
    monkeypatch.undo()
    assert seen == [1]  # sampling stopped at once
    # the KV caches and the per-step buffers were let go although the call raised
    (ctx,) = contexts
    assert not ctx.layouts
    assert all(k is None for cache in (ctx.full, ctx.text_dropped, ctx.image_dropped) for k in cache.keys)
    gc.collect()
    # no thread of the call outlives it (threads of earlier tests may end meanwhile: compare sets, not counts)
    assert set(threading.enumerate()) - threads_before == set()
    # no state survives a cancelled call: the next one equals a clean run
    again = pipe("a cat", seed=11, output_type="latent", **FAST).images[0]
    assert torch.equal(clean, again)


def test_bfloat16_weights_run_with_float32_latents(tiny_model, pipe):
    half = Echo4oPipeline.from_pretrained(tiny_model, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    out = half("a cat", seed=0, output_type="latent", **FAST)
    latent = out.images[0]
    assert out.params["dtype"] == "bfloat16"
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all()
    full = pipe("a cat", seed=0, output_type="latent", **FAST).images[0]
    assert torch.nn.functional.cosine_similarity(latent.flatten(), full.flatten(), dim=0) > 0.9


@pytest.mark.gpu
def test_cuda_matches_cpu_and_every_available_backend_agrees(tiny_model, pipe):
    """Same seed, same numbers on any device (noise drawn on the CPU); each attention backend gives the same
    image in bfloat16 up to bfloat16 rounding."""
    from worker.engine.attention import backend_availability

    kwargs = {"height": 64, "width": 64, "num_steps": 4, "seed": 3, "output_type": "latent"}
    cpu = pipe("a cat", **kwargs).images[0]
    gpu = Echo4oPipeline.from_pretrained(tiny_model, device="cuda", dtype="float32", attention="sdpa")
    assert (gpu("a cat", **kwargs).images[0] - cpu).abs().max() < 1e-3
    latents = {}
    for backend in ("sdpa", "xformers", "flash_attn"):
        if not backend_availability(backend, torch.device("cuda"), torch.bfloat16)[0]:
            continue
        half = Echo4oPipeline.from_pretrained(tiny_model, device="cuda", dtype="bfloat16", attention=backend)
        assert half.attention_backend == backend
        latents[backend] = half("a cat", **kwargs).images[0]
    for latent in latents.values():
        assert torch.nn.functional.cosine_similarity(latent.flatten(), cpu.flatten(), dim=0) > 0.9
