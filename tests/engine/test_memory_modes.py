"""Memory modes (worker/engine/memory.py) on the tiny model, on the CPU: each mode loads through
``Echo4oPipeline.from_pretrained``, generates an image close to the full-precision one, and holds exactly the
bytes the arithmetic of ``expected_memory`` says (device and host, per part)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.memory import (
    MODES,
    PARTS,
    MemoryMode,
    available_modes,
    check_memory_mode,
    expected_memory,
    measure_memory,
    parse_memory_mode,
)
from worker.engine.pipeline import Echo4oPipeline

SIZE = 64
STEPS = 3
# mean / max absolute difference (0..255 pixels) to the full-precision image of the same seed. Offload alone
# changes nothing; int8 moves pixels by about 1 on average, nf4 by about 5 on the tiny random model.
TOLERANCE = {None: (0.0, 0.0), "int8": (3.0, 32.0), "nf4": (12.0, 96.0)}


def _generate(pipe: Echo4oPipeline) -> np.ndarray:
    out = pipe("a red panda asleep on a bed", height=SIZE, width=SIZE, num_steps=STEPS, seed=3)
    return np.asarray(out.images[0]).astype(np.float64)


@pytest.fixture(scope="module")
def reference(tiny_model) -> np.ndarray:
    return _generate(Echo4oPipeline.from_pretrained(tiny_model, device="cpu", memory_mode="full"))


@pytest.mark.parametrize("text,mode", [
    ("full", MemoryMode()), ("", MemoryMode()), ("INT8", MemoryMode("int8")), ("int4", MemoryMode("nf4")),
    ("offload", MemoryMode(None, True)), ("offload+nf4", MemoryMode("nf4", True)),
    (" int8 + offload ", MemoryMode("int8", True)),
])
def test_modes_are_parsed_in_any_case_and_order(text, mode):
    assert parse_memory_mode(text) == mode
    assert parse_memory_mode(mode.name) == mode
    assert mode.name in MODES


@pytest.mark.parametrize("text", ["fp8", "int8+nf4", "offload+offload", "full+offload", "int8+"])
def test_unknown_modes_are_refused_listing_the_choices(text):
    with pytest.raises(ValueError, match="int8\\+offload"):
        parse_memory_mode(text)


def test_a_mode_and_a_device_map_are_refused_together():
    with pytest.raises(ValueError, match="device map"):
        check_memory_mode("int8", torch.device("cpu"), {"": "cpu"})
    assert check_memory_mode("full", torch.device("cpu"), {"": "cpu"}).is_full


def test_every_mode_runs_on_this_machine():
    """bitsandbytes (gpu extra, with its CPU backend) and accelerate are installed here: nothing is refused."""
    assert {name: ok for name, (ok, _why) in available_modes().items()} == dict.fromkeys(MODES, True)


def test_bad_mode_is_refused_by_from_pretrained_before_loading(tiny_model):
    with pytest.raises(ValueError, match="memory mode 'tiny'"):
        Echo4oPipeline.from_pretrained(tiny_model, device="cpu", memory_mode="tiny")


@pytest.mark.parametrize("name", [m for m in MODES if m != "full"])
def test_each_mode_generates_close_to_full_precision_with_the_expected_bytes(tiny_model, reference, name):
    pipe = Echo4oPipeline.from_pretrained(tiny_model, device="cpu", memory_mode=name)
    mode = parse_memory_mode(name)
    expected = expected_memory(pipe.config, mode, pipe.dtype)
    loaded = measure_memory(pipe.model, pipe.vae, mode)  # the layout a GPU keeps
    image = _generate(pipe)
    diff = np.abs(image - reference)
    mean_tol, max_tol = TOLERANCE[mode.quant]
    assert diff.mean() <= mean_tol and diff.max() <= max_tol, (name, diff.mean(), diff.max())
    if mode.quant:
        assert diff.max() > 0  # the weights really are quantized

    # On the CPU, bitsandbytes 0.50 repacks a 4-bit layer at its first forward for its CPU kernel (the scales
    # become bfloat16): what is resident after generating may only be smaller than what was loaded.
    measured = measure_memory(pipe.model, pipe.vae, mode)
    for part in PARTS:
        assert loaded.parts[part] == expected.parts[part], part
        assert measured.parts[part].device_bytes <= expected.parts[part].device_bytes, part
        assert measured.parts[part].host_bytes == expected.parts[part].host_bytes, part
    full = expected_memory(pipe.config, "full", pipe.dtype)
    assert expected.params == full.params
    assert expected.device_bytes < full.device_bytes
    assert pipe.model.language_model.lm_head.weight.device.type == "meta"  # not kept: never used to generate
    if mode.offload:
        assert expected.parts["llm_und"].device_bytes == 0 and expected.parts["vae"].device_bytes == 0
        assert expected.host_bytes == sum(full.parts[p].device_bytes for p in ("llm_und", "vit", "vae"))


def test_full_mode_arithmetic_matches_the_loaded_model(tiny_model):
    pipe = Echo4oPipeline.from_pretrained(tiny_model, device="cpu", dtype="bfloat16")
    expected = expected_memory(pipe.config, "full", torch.bfloat16)
    measured = measure_memory(pipe.model, pipe.vae)
    assert measured.parts == expected.parts
    assert expected.host_bytes == 0


def test_released_shape_figures():
    """The arithmetic docs/performance.md quotes, for the released shape in bfloat16."""
    from benchmarks.engine_bench import full_config, parse_args

    config = full_config(parse_args(["--model", "full"]))
    gib = {name: expected_memory(config, name, torch.bfloat16) for name in MODES}
    assert gib["full"].params == pytest.approx(14.69e9, rel=1e-3)
    assert gib["full"].device_bytes / 2**30 == pytest.approx(27.37, abs=0.01)
    und = gib["full"].parts["llm_und"]
    assert und.params == gib["full"].parts["llm_gen"].params == pytest.approx(6.53e9, rel=1e-3)
    # int8: 1 byte + a row scale per weight of both experts; nf4: half a byte + a scale per 64 weights
    assert gib["int8"].device_bytes / 2**30 == pytest.approx(14.21, abs=0.01)
    assert gib["nf4"].device_bytes / 2**30 == pytest.approx(8.88, abs=0.01)
    assert gib["offload"].device_bytes / 2**30 == pytest.approx(13.26, abs=0.01)
    assert gib["nf4+offload"].device_bytes / 2**30 == pytest.approx(4.52, abs=0.01)
    assert gib["offload"].host_bytes / 2**30 == pytest.approx(13.09, abs=0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "nf4", "offload", "nf4+offload"])
def test_each_mode_runs_its_kernels_on_cuda(tiny_model, name):
    """bitsandbytes' CUDA kernels and accelerate's streaming: the image stays close to full precision and the
    weights on the card are what the arithmetic says."""
    full = _generate(Echo4oPipeline.from_pretrained(tiny_model, device="cuda", dtype="bfloat16"))
    pipe = Echo4oPipeline.from_pretrained(tiny_model, device="cuda", dtype="bfloat16", memory_mode=name)
    mode = parse_memory_mode(name)
    diff = np.abs(_generate(pipe) - full)
    mean_tol, max_tol = TOLERANCE[mode.quant]
    assert diff.mean() <= max(mean_tol, 2.0) and diff.max() <= max(max_tol, 32.0), (name, diff.mean(), diff.max())
    measured = measure_memory(pipe.model, pipe.vae, mode)
    assert measured.parts == expected_memory(pipe.config, mode, torch.bfloat16).parts
    # resident means on the card: nothing was left behind in host memory outside the offload hooks
    tensors = [*pipe.model.parameters(), *pipe.model.buffers(), *pipe.vae.parameters()]
    assert {t.device.type for t in tensors} <= {"cuda", "meta"}
