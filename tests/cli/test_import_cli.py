"""``echo4o import``: a checkpoint trained elsewhere becomes a registered version in the released layout; the
ViT groups the reference trainer leaves out are filled from the base, any other missing key is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from echo4o import versions
from echo4o.cli import app
from echo4o.db import session_scope
from echo4o.settings import get_settings
from worker.engine.tiny import write_tiny_model

VIT_GROUPS = ("vit_model.", "vit_pos_embed.")


def _trained_elsewhere(folder: Path, *, drop: tuple[str, ...]) -> Path:
    """A checkpoint as the reference trainer writes it: only ema.safetensors, without the keys in ``drop``."""
    full = write_tiny_model(folder.with_name(folder.name + "-full"), seed=1)
    folder.mkdir(parents=True)
    tensors = {k: v for k, v in load_file(full / "ema.safetensors").items() if not k.startswith(drop)}
    save_file(tensors, folder / "ema.safetensors")
    return folder


def _import(*args: str):
    return CliRunner().invoke(app, ["import", *args])


def _registered() -> list[str]:
    with session_scope(get_settings().database_url) as s:
        return [v.ref for v in versions.list_versions(s)]


def test_missing_vit_groups_are_filled_from_the_base(tiny_model: Path, tmp_path: Path) -> None:
    source = _trained_elsewhere(tmp_path / "run" / "0000500", drop=VIT_GROUPS)
    weights = tmp_path / "weights"
    r = _import(str(source), "--name", "echo4o", "--version", "ext-1", "--base", str(tiny_model), "--dir",
                str(weights))
    assert r.exit_code == 0, r.output
    assert "missing keys (vit_model, vit_pos_embed) from the base" in r.output
    assert "registered echo4o/ext-1" in r.output
    target = weights / "echo4o" / "ext-1"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["filled_from_base"]["groups"] == ["vit_model", "vit_pos_embed"]
    assert manifest["filled_from_base"]["keys"] > 0 and manifest["base"] == str(tiny_model)
    assert {"llm_config.json", "vit_config.json", "ae.safetensors"} <= set(manifest["files_from_base"])
    assert manifest["source"] == f"import:{source.resolve()}" and "ema.safetensors" in manifest["files"]

    written, base, trained = (load_file(p / "ema.safetensors") for p in (target, tiny_model, source))
    assert set(written) == set(base)
    for key, tensor in written.items():
        expected = base[key] if key.startswith(VIT_GROUPS) else trained[key]
        assert tensor.equal(expected), key
    assert any(not written[k].equal(base[k]) for k in trained)  # the trained weights are not the base's
    with session_scope(get_settings().database_url) as s:
        row = versions.get_version(s, "echo4o/ext-1")
        assert row is not None and row.source == "import" and row.path == str(target)
        assert row.manifest == manifest

    from worker.engine import Echo4oPipeline

    pipe = Echo4oPipeline.from_pretrained(target, device="cpu")
    assert pipe("x", height=16, width=16, num_steps=2, seed=0).images[0].size == (16, 16)


def test_another_missing_key_is_an_error_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    with safe_open(str(tiny_model / "ema.safetensors"), "pt") as f:
        llm_key = next(k for k in f.keys() if k.startswith("language_model."))  # noqa: SIM118
    source = _trained_elsewhere(tmp_path / "run" / "0000500", drop=(*VIT_GROUPS, llm_key))
    weights = tmp_path / "weights"
    r = _import(str(source), "--version", "bad", "--base", str(tiny_model), "--dir", str(weights))
    assert r.exit_code == 2, r.output
    assert f"lacks 1 keys that cannot be taken from the base (first: {llm_key})" in r.output
    assert not (weights / "imported" / "bad").exists() and _registered() == []


def test_a_complete_checkpoint_is_copied_as_it_is(tmp_path: Path) -> None:
    source = write_tiny_model(tmp_path / "ours" / "ft-3", seed=2)
    weights = tmp_path / "weights"
    r = _import(str(source), "--base", str(tmp_path / "nowhere"), "--dir", str(weights))  # the base is not needed
    assert r.exit_code == 0, r.output
    assert "filled" not in r.output and "from the base" not in r.output
    target = weights / "imported" / "ft-3"
    assert (target / "ema.safetensors").read_bytes() == (source / "ema.safetensors").read_bytes()
    manifest = json.loads((target / "manifest.json").read_text())
    assert (manifest["filled_from_base"], manifest["files_from_base"], manifest["base"]) == (None, [], None)
    assert _registered() == ["imported/ft-3"]
    again = _import(str(source), "--base", str(tmp_path / "nowhere"), "--dir", str(weights))
    assert again.exit_code == 2 and "imported/ft-3 is registered already" in again.output


@pytest.mark.parametrize(("args", "message"), [
    (["--name", "a/b"], "--name/--version: name 'a/b' is not valid"),
    (["--version", "x", "--base", "/nowhere"], "has no ema.safetensors"),
])
def test_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    r = _import(str(tmp_path / "empty"), "--dir", str(tmp_path / "weights"), *args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_models_list_promote_rollback(tmp_path: Path) -> None:
    source = write_tiny_model(tmp_path / "ours" / "ft-4", seed=3)
    assert _import(str(source), "--name", "echo4o", "--dir", str(tmp_path / "weights")).exit_code == 0
    runner = CliRunner()
    configured = get_settings().model_version
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and listed.output.splitlines()[0].startswith(f"* {configured}  configured")
    assert "  echo4o/ft-4  import  " in listed.output
    r = runner.invoke(app, ["models", "promote", "echo4o/ft-4"])
    assert r.exit_code == 0 and r.output.strip() == f"current: echo4o/ft-4 (was {configured})"
    assert runner.invoke(app, ["models", "list"]).output.splitlines()[1].startswith("* echo4o/ft-4")
    unknown = runner.invoke(app, ["models", "promote", "echo4o/nope"])
    assert unknown.exit_code == 2 and "'echo4o/nope' is not registered" in unknown.output
    r = runner.invoke(app, ["models", "rollback"])
    assert r.exit_code == 0 and r.output.strip() == f"current: {configured} (was echo4o/ft-4)"
    again = runner.invoke(app, ["models", "rollback"])
    assert again.exit_code == 1 and "nothing to roll back to" in again.output
    with session_scope(get_settings().database_url) as s:
        assert [p.promoted_by.startswith("cli") for p in versions.list_promotions(s)] == [True]
