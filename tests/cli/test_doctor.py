"""`echo4o doctor` as users run it (a subprocess), on this CPU machine: sdpa runs, xformers does not and says
why (no CPU kernel; its compiled library, reported apart, wants torch 2.10.0+cu128), flash_attn needs CUDA;
memory modes and RAM are listed; the exit code is 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

ECHO4O = [sys.executable, "-m", "echo4o"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the lines of a CPU machine")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ECHO4O, "doctor", *args], capture_output=True, text=True, timeout=240)


def test_doctor_reports_what_runs_here():
    proc = run()
    assert proc.returncode == 0, proc.stderr
    # bitsandbytes' import-time warning about an optional CPU kernel from the Hub is filtered (echo4o.logging)
    assert "Failed to load CPU gemm_4bit_forward" not in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    assert f"torch {torch.__version__}" in lines
    assert "cuda available: no (torch built with CUDA none)" in lines
    assert not any(line.startswith("device cuda:") for line in lines)
    assert "attention (tested on cpu, float32):" in lines
    assert "  sdpa: OK" in lines
    xformers = next(line for line in lines if line.startswith("  xformers: "))
    assert xformers == "  xformers: not running: xformers has no kernel for device 'cpu' (it needs CUDA)"
    library = lines[lines.index(xformers) + 1]
    assert library.startswith("    compiled library: not loaded: ")
    assert "built for torch 2.10.0+cu128 with CUDA 12.8" in library and "attention does not use it" in library
    assert next(line for line in lines if line.startswith("  flash_attn: ")).startswith("  flash_attn: not running: ")
    for mode in ("full", "int8", "nf4", "offload", "int8+offload", "nf4+offload"):
        assert any(line.startswith(f"  {mode}: OK") for line in lines), mode
    assert any(line.startswith("  int8: OK (bitsandbytes ") for line in lines)
    ram = next(line for line in lines if line.startswith("ram: "))
    assert " GiB free of " in ram


def test_doctor_json_has_the_same_facts():
    """The data behind both outputs (in process: one subprocess above is enough for the exit code)."""
    from echo4o.cli.doctor import collect, render

    info = json.loads(json.dumps(collect()))
    assert render(info).startswith(f"python {info['python']}\ntorch {torch.__version__}\n")
    assert info["torch"] == torch.__version__ and info["cuda_available"] is False and info["devices"] == []
    backends = info["attention"]["backends"]
    assert backends["sdpa"] == {"ok": True, "reason": ""}
    assert backends["xformers"]["ok"] is False and backends["xformers"]["library"]["loaded"] is False
    assert "needs CUDA" in backends["xformers"]["reason"]
    assert "2.10.0+cu128" in backends["xformers"]["library"]["detail"]
    assert all(entry["ok"] for entry in info["memory_modes"].values())
    assert 0 < info["ram"]["available_bytes"] <= info["ram"]["total_bytes"]
