"""``echo4o finetune`` as users run it (a real subprocess): trains the tiny model on tiny data with a progress
bar, writes the version with its manifest and TensorBoard events, resumes a folder that has checkpoints, and
turns bad options and bad data into one `error:` line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from echo4o.cli import COMMAND_MODULES
from worker.training.data import TEXT_TO_IMAGE, write_test_dataset

SMALL = ["--mode", "lora", "--lr", "2e-3", "--warmup-steps", "0", "--expected-tokens", "1", "--max-tokens", "400",
         "--vae-min-size", "32", "--vae-max-size", "32", "--device", "cpu"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHO4O_", "HF_"))}
    return subprocess.run([sys.executable, "-m", "echo4o", "finetune", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_finetune_is_registered() -> None:
    assert "echo4o.cli.finetune" in COMMAND_MODULES


def test_a_run_writes_the_version_and_a_second_run_resumes_it(tiny_model: Path, tmp_path: Path) -> None:
    data = write_test_dataset(tmp_path / "data", TEXT_TO_IMAGE, num_rows=2, bad_rows=1)
    out = tmp_path / "out"
    first = run("--model", str(tiny_model), "--data", str(data), "--out", str(out), "--steps", "3",
                "--save-every", "3", *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3/3" in first.stderr and "loss=" in first.stderr  # the tqdm bar, with its postfix
    assert f"wrote {out}: 3 steps" in first.stdout and "1 data rows skipped" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["mode"] == "lora" and manifest["hyperparameters"]["lr"] == 2e-3
    assert (out / "ema.safetensors").is_file() and list((out / "tensorboard").glob("events.out.tfevents.*"))

    more = run("--model", str(tiny_model), "--data", str(data), "--out", str(out), "--steps", "5", *SMALL)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming" in more.stderr and "from step 3" in more.stderr
    assert json.loads((out / "manifest.json").read_text())["steps"] == 5


def test_bad_options_and_bad_data_are_one_error_line(tiny_model: Path, tmp_path: Path) -> None:
    good = write_test_dataset(tmp_path / "good", TEXT_TO_IMAGE, num_rows=1)
    bad_mode = run("--model", str(tiny_model), "--data", str(good), "--out", str(tmp_path / "o1"), "--mode", "qlora")
    assert bad_mode.returncode == 2 and "error: --mode: Input should be 'lora' or 'full'" in bad_mode.stderr

    columns = tmp_path / "columns"
    columns.mkdir()
    pq.write_table(pa.table({"picture": [b"x"], "text": ["a cat"]}), columns / "wrong.parquet")
    undecodable = write_test_dataset(tmp_path / "undecodable", TEXT_TO_IMAGE, num_rows=0, bad_rows=2)
    for data, text in ((columns, "has columns ['picture', 'text']"), (undecodable, "no usable row"),
                       (tmp_path / "missing", "neither an existing file or folder nor a Hub dataset id")):
        out = run("--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "o2"), "--steps", "2",
                  *SMALL)
        assert out.returncode == 2, out.stderr[-2000:]
        error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and error_lines[0].startswith("error: --data: ") and text in error_lines[0]
