"""benchmarks/engine_bench.py runs end to end on the tiny model and writes its figures as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_prints_and_writes_json(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--steps", "3", "--size", "64",
         "--device", "cpu", "--attention", "sdpa", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("load", "prefill", "step", "decode", "image", "peak mem"):
        assert f"  {label}" in proc.stdout
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["device"] == "cpu" and result["attention"] == "sdpa"
    assert (result["height"], result["width"], result["steps"]) == (64, 64, 2)
    for key in ("load_s", "prefill_s", "step_s", "decode_s", "image_s", "peak_memory_gb"):
        assert result[key] > 0, key
    # batched guidance and cross-request batching, measured side by side (figures only: no timed asserts)
    assert result["cfg_branches"] == 2  # text-to-image: full and text-dropped
    for key in ("cfg_batched_speedup", "cfg_sequential_step_s", "cfg_batched_step_s", "request_batching_speedup_8",
                "request_batching_images_per_s_batched_8", "request_batching_images_per_s_sequential_8"):
        assert result[key] > 0, key
    assert result["cfg_batched_max_abs_diff"] < 1e-4  # the same latents either way
    # the step cache: 2 steps, both always computed (first and last), so exactly the uncached result
    assert result["step_cache_speedup"] > 0 and result["step_cache_threshold"] > 0
    assert result["step_cache_steps_computed"] == result["step_cache_steps_total"] == 2
    assert result["step_cache_max_abs_diff"] == 0 and result["step_cache_pixel_max_abs_diff"] == 0


def test_bad_size_is_a_clear_error(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--size", "60", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert "height must be a multiple of 16" in proc.stderr and "Traceback" not in proc.stderr


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_bench", ROOT / "benchmarks" / "engine_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_shape_is_the_released_7b_mot():
    """``--model full`` without ``--layers`` builds the released shape: 28 MoT layers, both experts, ~14.7B
    parameters (about 27 GiB in bfloat16); built on meta here, nothing allocated."""
    import torch

    from worker.engine.models.bagel import Bagel

    bench = _load_bench()
    config = bench.full_config(bench.parse_args(["--model", "full"]))
    llm = config.llm
    assert (llm.num_hidden_layers, llm.hidden_size, llm.intermediate_size) == (28, 3584, 18944)
    assert (llm.num_attention_heads, llm.num_key_value_heads) == (28, 4)
    with torch.device("meta"):
        model = Bagel(config)
    layer = model.language_model.model.layers[0]
    assert hasattr(layer.mlp, "gate_proj") and hasattr(layer.mlp_moe_gen, "gate_proj")  # both experts
    numel = sum(p.numel() for p in model.parameters())
    assert 14.5e9 < numel < 14.8e9, numel
    assert all(p.is_meta for p in model.parameters())


def test_full_size_that_cannot_fit_is_refused_before_allocating(tmp_path: Path):
    """Asking for more than the machine holds fails at once, saying how much is needed and what fits."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--model", "full", "--layers", "1000",
         "--device", "cpu", "--dtype", "float32"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "--model full with 1000 decoder layers needs about" in proc.stderr
    assert "GiB is available RAM" in proc.stderr and "--layers" in proc.stderr
