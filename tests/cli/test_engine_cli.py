"""``echo4o make-tiny``, ``generate`` and ``download`` run as users run them: real subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from echo4o.pnginfo import PARAMS_KEY, params_from_png
from tests.support.png import png_difference

ECHO4O = [sys.executable, "-m", "echo4o"]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHO4O_", "HF_"))}
    full_env |= {"ECHO4O_LOG_LEVEL": "WARNING"} | (env or {})
    return subprocess.run([*ECHO4O, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ download


def test_download_without_network_is_a_clear_error(tmp_path: Path):
    # nothing listens on this port: the Hub is unreachable, as on a machine without network
    out = run("download", "Yejy53/Echo-4o", "--dir", str(tmp_path),
              env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert out.returncode == 1, out.stderr
    assert "cannot fetch Yejy53/Echo-4o from the Hugging Face Hub" in out.stderr
    assert "copy the weights by hand" in out.stderr and str(tmp_path / "echo4o" / "main") in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "echo4o").exists()


def test_download_offline_mode_names_the_variable(tmp_path: Path):
    out = run("download", "ByteDance-Seed/BAGEL-7B-MoT", "--dir", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "HF_HUB_OFFLINE" in out.stderr and "bagel-7b-mot/main" in out.stderr


def test_download_refuses_a_local_path(tmp_path: Path):
    out = run("download", str(tmp_path))
    assert out.returncode == 2 and "not a Hub id" in out.stderr


def test_manifest_lists_sizes_and_sha256(tmp_path: Path):
    from echo4o.cli.engine import write_manifest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_bytes(b"x")
    manifest = write_manifest(tmp_path, name="echo4o", version="main", source="hf://Yejy53/Echo-4o@abc123")
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["files"] == {
        "a.txt": {"bytes": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        "sub/b.bin": {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()},
    }
    assert manifest["source"] == "hf://Yejy53/Echo-4o@abc123" and manifest["parent"] is None


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--aspect", "2:1"], "error: --aspect: aspect_ratio: Input should be '1:1', '4:3', '3:4', '16:9' or '9:16'"),
        (["--aspect", "4:3", "--height", "64", "--width", "64"],
         "error: --aspect: aspect_ratio: aspect_ratio '4:3' means height=768, width=1024; give either"),
        (["--height", "64"], "error: --width: width: width is missing: give both height and width"),
        (["--height", "72", "--width", "64"], "error: --height: height: Input should be a multiple of 16"),
        (["--height", "64", "--width", "2048"], "error: --width: width: Input should be less than or equal to 1024"),
        (["--seed", str(2**32)], "error: --seed: seed: Input should be less than or equal to 4294967295"),
        (["--steps", "1"], "error: --steps: num_steps: Input should be greater than or equal to 2"),
        (["--cfg-renorm-type", "local"], "error: --cfg-renorm-type: cfg_renorm_type: Input should be 'global'"),
        (["--attention", "flex"], "error: --attention: Input should be 'auto', 'sdpa', 'xformers' or 'flash_attn'"),
        (["--device", "mps"], "error: --device: must be auto, cpu, cuda or cuda:N"),
        (["--ref", "missing.png"], "error: --ref: references.0: cannot read stored reference"),
    ],
)
def test_generate_argument_errors_before_loading(tmp_path: Path, args: list[str], message: str):
    # the model folder does not exist: every one of these is refused before the model would load
    out = run("generate", "--prompt", "x", "--out", str(tmp_path / "a.png"), "--model", str(tmp_path / "none"),
              *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and "none" not in out.stderr
    assert not (tmp_path / "a.png").exists()


def test_generate_reports_every_bad_field_one_line_each(tmp_path: Path):
    out = run("generate", "--prompt", " ", "--steps", "1000", "--num-images", "9", "--out", str(tmp_path / "a.png"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert [line.split(":", 2)[1].strip() for line in lines] == ["--prompt", "--steps", "--num-images"], lines
    assert all(line.startswith("error: ") for line in lines)


def test_generate_needs_a_prompt_or_a_png(tmp_path: Path):
    out = run("generate", "--out", str(tmp_path / "a.png"))
    assert out.returncode == 2 and "--prompt is required (or --from a PNG that carries one)" in out.stderr


def test_generate_from_a_png_without_our_parameters_is_a_clear_error(tmp_path: Path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    out = run("generate", "--from", str(tmp_path / "plain.png"), "--out", str(tmp_path / "a.png"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: --from: ") and "carries no echo4o generation parameters" in out.stderr
    assert "Traceback" not in out.stderr
    missing = run("generate", "--from", str(tmp_path / "gone.png"), "--out", str(tmp_path / "a.png"))
    assert missing.returncode == 2 and "gone.png" in missing.stderr and "Traceback" not in missing.stderr


def test_generate_needs_png_output(tmp_path: Path):
    out = run("generate", "--prompt", "x", "--out", str(tmp_path / "a.jpg"))
    assert out.returncode == 2 and "--out must be a .png" in out.stderr


def test_generate_missing_model_folder_is_a_clear_error(tmp_path: Path):
    out = run("generate", "--prompt", "x", "--out", str(tmp_path / "a.png"), "--model", str(tmp_path / "nope"),
              "--device", "cpu")
    # exit 1: the command was right, the model could not be had (bad options exit 2)
    assert out.returncode == 1, out.stderr
    assert "nope" in out.stderr and "does not exist" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cli_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("cli") / "tiny" / "v1"
    result = run("make-tiny", str(out_dir), "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out_dir}" in result.stdout
    return out_dir


def test_make_tiny_writes_the_released_layout_and_a_manifest(cli_tiny_model: Path):
    for name in ("llm_config.json", "vit_config.json", "ae.safetensors", "ema.safetensors", "tokenizer_config.json",
                 "manifest.json"):
        assert (cli_tiny_model / name).is_file(), name
    manifest = json.loads((cli_tiny_model / "manifest.json").read_text())
    assert manifest["source"] == "make-tiny"
    assert manifest["files"]["ema.safetensors"]["bytes"] == (cli_tiny_model / "ema.safetensors").stat().st_size


def _generate(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("generate", "--model", str(model), "--prompt", "a red panda on a bed", "--steps", "3",
               "--height", "64", "--width", "64", "--device", "cpu", "--attention", "sdpa", "--out", str(out), *extra)


def test_generate_same_seed_same_bytes_params_in_png(cli_tiny_model: Path, tmp_path: Path):
    a = _generate(cli_tiny_model, tmp_path / "a.png", "--seed", "7")
    assert a.returncode == 0, a.stderr
    b = _generate(cli_tiny_model, tmp_path / "b.png", "--seed", "7", "--quiet")
    assert b.returncode == 0, b.stderr
    c = _generate(cli_tiny_model, tmp_path / "c.png", "--seed", "8", "--quiet")
    assert c.returncode == 0, c.stderr
    assert png_difference(tmp_path / "a.png", tmp_path / "b.png") is None
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()
    assert "2/2" in a.stderr  # the progress bar ran over the 2 denoising steps
    assert "seed 7, 64x64, 2 steps, attention sdpa" in a.stdout
    assert "can't load C++/CUDA extensions" not in a.stderr  # xformers' warning means nothing on a CPU machine

    params = params_from_png(tmp_path / "a.png")
    assert params["prompt"] == "a red panda on a bed"
    assert params["seed"] == 7 and params["num_steps"] == 3
    assert (params["height"], params["width"]) == (64, 64)
    assert params["cfg_text_scale"] == 4.0 and params["cfg_img_scale"] == 1.0
    assert params["cfg_interval"] == [0.4, 1.0] and params["cfg_renorm_type"] == "global"
    with Image.open(tmp_path / "a.png") as img:
        assert img.size == (64, 64)
        assert PARAMS_KEY in img.text and img.text["seed"] == "7" and img.text["prompt"] == "a red panda on a bed"


def test_generate_with_references(cli_tiny_model: Path, tmp_path: Path):
    Image.new("RGB", (90, 60), (250, 10, 10)).save(tmp_path / "r1.png")
    Image.new("RGBA", (40, 80), (10, 10, 250, 128)).save(tmp_path / "r2.png")
    out = run("generate", "--model", str(cli_tiny_model), "--prompt", "put them together", "--steps", "2",
              "--ref", str(tmp_path / "r1.png"), "--ref", str(tmp_path / "r2.png"), "--seed", "1",
              "--device", "cpu", "--out", str(tmp_path / "m.png"), "--quiet")
    assert out.returncode == 0, out.stderr
    params = params_from_png(tmp_path / "m.png")
    assert params["references"] == ["r1.png", "r2.png"]
    assert params["cfg_img_scale"] == 2.0 and params["cfg_renorm_type"] == "text_channel"
    with Image.open(tmp_path / "m.png") as img:  # the size of the last reference after the VAE transform
        assert img.size == (params["width"], params["height"])


def test_generate_from_png_reproduces_it_byte_for_byte(cli_tiny_model: Path, tmp_path: Path):
    first = _generate(cli_tiny_model, tmp_path / "a.png", "--quiet", "--cfg-text-scale", "3.5")  # seed drawn
    assert first.returncode == 0, first.stderr
    again = run("generate", "--from", str(tmp_path / "a.png"), "--out", str(tmp_path / "again.png"), "--quiet")
    assert again.returncode == 0, again.stderr
    assert png_difference(tmp_path / "a.png", tmp_path / "again.png") is None

    # options given on the command line override the embedded ones; the rest stay
    other = run("generate", "--from", str(tmp_path / "a.png"), "--out", str(tmp_path / "other.png"), "--quiet",
                "--seed", "11", "--width", "32", "--height", "48")
    assert other.returncode == 0, other.stderr
    before, after = params_from_png(tmp_path / "a.png"), params_from_png(tmp_path / "other.png")
    assert (after["seed"], after["height"], after["width"]) == (11, 48, 32)
    assert {k: v for k, v in after.items() if k not in ("seed", "height", "width")} == {
        k: v for k, v in before.items() if k not in ("seed", "height", "width")}
    assert after["cfg_text_scale"] == 3.5 and after["prompt"] == "a red panda on a bed"


def test_generate_from_png_with_references_finds_them_beside_it(cli_tiny_model: Path, tmp_path: Path):
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (48, 32), (250, 10, 10)).save(tmp_path / "refs" / "r1.png")
    out_dir = tmp_path / "out"
    first = run("generate", "--model", str(cli_tiny_model), "--prompt", "make it blue", "--steps", "2", "--seed", "5",
                "--ref", str(tmp_path / "refs" / "r1.png"), "--device", "cpu", "--out", str(out_dir / "m.png"),
                "--quiet")
    assert first.returncode == 0, first.stderr
    assert params_from_png(out_dir / "m.png")["references"] == ["../refs/r1.png"]  # relative to the PNG
    again = run("generate", "--from", str(out_dir / "m.png"), "--out", str(out_dir / "m2.png"), "--quiet",
                cwd=cli_tiny_model)  # another working directory: the references are found beside the PNG
    assert again.returncode == 0, again.stderr
    assert png_difference(out_dir / "m.png", out_dir / "m2.png") is None
