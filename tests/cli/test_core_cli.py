"""`echo4o` runs as users run it: a real subprocess of the installed console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import echo4o

ECHO4O = [sys.executable, "-m", "echo4o"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO4O_")} | (env or {})
    return subprocess.run([*ECHO4O, *args], capture_output=True, text=True, env=full_env, timeout=120)


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert "version" in out.stdout and "config" in out.stdout


def test_every_command_has_help() -> None:
    import typer.main

    from echo4o.cli import app

    group = typer.main.get_command(app)
    for name in group.commands:
        out = run(name, "--help")
        assert out.returncode == 0, f"{name} --help: {out.stderr}"
        assert "Usage" in out.stdout


def test_version() -> None:
    out = run("version")
    assert out.returncode == 0
    assert f"echo4o {echo4o.__version__}" in out.stdout


def test_config_json_masks_secrets(tmp_path: Path) -> None:
    out = run("config", "--json", env={"ECHO4O_DATA_DIR": str(tmp_path), "ECHO4O_HF_TOKEN": "hf_abc"})
    assert out.returncode == 0, out.stderr
    values = json.loads(out.stdout)
    assert values["data_dir"] == str(tmp_path)
    assert values["hf_token"] == "********"


def test_bad_setting_is_one_clear_line() -> None:
    out = run("config", env={"ECHO4O_DTYPE": "float7"})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ECHO4O_DTYPE:") and "float7" in lines[0]


def test_device_the_engine_cannot_load_onto_is_refused_at_start() -> None:
    out = run("config", env={"ECHO4O_DEVICE": "mps"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: ECHO4O_DEVICE: must be auto, cpu, cuda or cuda:N (N: a CUDA device index, e.g. cuda:0) (got 'mps')"
    ]


def test_engine_options_are_checked_like_the_engine_spells_them() -> None:
    ok = run("config", "--json", env={"ECHO4O_DEVICE": "CUDA:1", "ECHO4O_DTYPE": "torch.BFloat16",
                                      "ECHO4O_ATTENTION": "SDPA"})
    assert ok.returncode == 0, ok.stderr
    values = json.loads(ok.stdout)
    assert (values["device"], values["dtype"], values["attention"]) == ("cuda:1", "bfloat16", "sdpa")
    bad = run("config", env={"ECHO4O_ATTENTION": "flash3"})
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ECHO4O_ATTENTION: Input should be 'auto', 'sdpa', 'xformers' or 'flash_attn'")


def test_no_library_noise_on_stderr() -> None:
    # xformers (installed) warns that it cannot load its CUDA extensions on a CPU machine; the worker command
    # imports the engine, and with it xformers, before it parses --queues
    for args in (["--help"], ["config"], ["worker", "--queues", "nope"]):
        out = run(*args)
        assert "can't load C++/CUDA extensions" not in out.stderr, args
        assert "WARNING[XFORMERS]" not in out.stderr, args


def test_config_reference_is_the_table_in_docs_configuration_md() -> None:
    """Every setting has a row (variable, default, meaning), and docs/configuration.md holds the same table."""
    from echo4o.settings import Settings

    out = run("config", "--reference")
    assert out.returncode == 0, out.stderr
    table = out.stdout.strip()
    rows = table.splitlines()[2:]
    assert [row.split(" | ")[0].strip("| `") for row in rows] == [
        f"ECHO4O_{name.upper()}" for name in Settings.model_fields]
    assert all(row.split(" | ")[2].strip(" |") for row in rows), "a setting without a meaning"
    assert "| `ECHO4O_PORT` | `8000` | Port the gateway listens on. (1-65535) |" in rows
    assert "| `ECHO4O_AUTH` | `keys` |" in table and "(one of `keys`, `off`)" in table
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    documented = doc.split("<!-- echo4o config --reference -->\n", 1)[1].split("\n<!-- end of", 1)[0]
    assert documented == table, "docs/configuration.md is out of date: paste `echo4o config --reference` into it"
