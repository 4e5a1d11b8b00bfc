"""scripts/gpu_check.sh cannot rot unseen: it parses, its dry run prints the whole plan and exits 0, and what
it calls (engine_bench flags and functions, memory modes) still exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_dry_run_prints_the_plan_and_exits_0(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in ("setup", "doctor", "gpu_tests", "bench_sdpa", "bench_xformers", "bench_flash_attn", "mode_int8",
                 "mode_nf4", "mode_offload", "mode_nf4+offload"):
        assert re.search(rf"^{re.escape(step)}\s+\|", out, re.M), step
    assert "--model full --device cuda --dtype bfloat16 --size 1024 --steps 50 --attention xformers" in out
    assert "python -m echo4o doctor --json" in out and "pytest -m gpu" in out
    assert f"figures -> {tmp_path}/gpu_check.json" in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_what_the_script_calls_still_exists():
    text = SCRIPT.read_text()
    help_text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--help"],
                               capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    for flag in ("--model", "--device", "--dtype", "--size", "--steps", "--attention", "--json", "--layers"):
        assert flag in text and flag in help_text, flag
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import engine_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name in ("parse_args", "build_full_random", "timed_call", "parse_size"):
        assert callable(getattr(engine_bench, name)), name
    from worker.engine.memory import MODES

    default_modes = re.search(r'MODES=\$\{GPU_CHECK_MODES:-([^}]*)\}', text).group(1).split()
    assert set(default_modes) <= set(MODES) - {"full"}


def test_layers_setting_reaches_every_full_model_step(tmp_path):
    """GPU_CHECK_LAYERS (a smoke run off a big GPU) builds that many decoder layers in the benchmark steps too,
    not only in the memory-mode ones."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path), "GPU_CHECK_LAYERS": "2"}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60).stdout
    bench_lines = [line for line in out.splitlines() if line.startswith("bench_")]
    assert len(bench_lines) == 3 and all("--model full" in line and "--layers 2" in line for line in bench_lines)
