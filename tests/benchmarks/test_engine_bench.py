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
         "--device", "cpu", "--attention", "sdpa", "--json", str(out)],
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


def test_bad_size_is_a_clear_error(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--size", "60", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert "height must be a multiple of 16" in proc.stderr and "Traceback" not in proc.stderr
