"""The Makefile's install recipe, as make reads it (``make -n``: printed, not run): the pinned torch from the
index ``TORCH_INDEX_URL`` names, before the project, and nothing extra without it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _install_commands(tmp_path: Path, *variables: str) -> list[str]:
    out = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}", *variables], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if " -m pip install " in line]


def test_torch_index_url_installs_the_pinned_torch_from_that_index_first(tmp_path: Path) -> None:
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    commands = _install_commands(tmp_path, "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert commands[1].endswith(f"pip install -q 'torch=={pinned}' --index-url https://download.pytorch.org/whl/cpu")
    assert commands[2].endswith("pip install -q -e '.[test,dev,gpu]'")


def test_without_it_pip_chooses_the_build(tmp_path: Path) -> None:
    commands = _install_commands(tmp_path)
    assert len(commands) == 2 and not any("torch==" in c for c in commands), commands
