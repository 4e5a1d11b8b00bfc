"""Checkpoint loading: strict keys, clear errors for renamed keys, missing or corrupt files and an unreachable Hub;
configs (ae_config.json optional); the tiny-model writer."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from worker.engine import Echo4oPipeline
from worker.engine.config import BagelConfig, VAEConfig
from worker.engine.loading import (
    CheckpointError,
    auto_device_map,
    load_bagel,
    load_vae,
    read_config,
    resolve_checkpoint,
)
from worker.engine.tiny import write_tiny_model


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_tiny_model_has_the_released_layout_and_is_small(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert names >= {"llm_config.json", "vit_config.json", "ae_config.json", "ema.safetensors", "ae.safetensors",
                     "vocab.json", "merges.txt", "tokenizer_config.json"}
    assert sum(p.stat().st_size for p in tiny_model.iterdir()) < 10 * 2**20
    with safe_open(str(tiny_model / "ae.safetensors"), "pt") as f:
        assert "decoder.up.0.block.0.conv1.weight" in f.keys()  # FLUX key names
        assert f.get_slice("encoder.mid.attn_1.q.weight").get_shape() == [32, 32, 1, 1]
    with safe_open(str(tiny_model / "ema.safetensors"), "pt") as f:
        assert "language_model.model.layers.1.self_attn.q_proj_moe_gen.weight" in f.keys()


def test_same_seed_writes_the_same_weights(tmp_path, tiny_model):
    other = write_tiny_model(tmp_path / "again", seed=0)
    assert (other / "ema.safetensors").read_bytes() == (tiny_model / "ema.safetensors").read_bytes()
    third = write_tiny_model(tmp_path / "seed1", seed=1)
    assert (third / "ema.safetensors").read_bytes() != (tiny_model / "ema.safetensors").read_bytes()


def test_strict_load_gives_every_tensor_of_the_file(tiny_model):
    config = read_config(tiny_model)
    model = load_bagel(tiny_model, config, torch.device("cpu"), torch.float32)
    file = load_file(str(tiny_model / "ema.safetensors"))
    state = model.state_dict()
    assert set(state) == set(file)
    assert all(torch.equal(state[k], file[k]) for k in file)
    assert not any(p.is_meta for p in model.parameters())
    assert model.language_model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_dtype_is_applied_while_streaming(tiny_model):
    config = read_config(tiny_model)
    model = load_bagel(tiny_model, config, torch.device("cpu"), torch.bfloat16)
    vae = load_vae(tiny_model, config, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_renamed_key_is_an_error_listing_missing_and_unexpected(model_copy):
    path = model_copy / "ema.safetensors"
    state = load_file(str(path))
    state["vae2llm.weight_renamed"] = state.pop("vae2llm.weight")
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        Echo4oPipeline.from_pretrained(model_copy, device="cpu")
    message = str(info.value)
    assert "ema.safetensors" in message
    assert "1 missing keys (first: vae2llm.weight)" in message
    assert "1 unexpected keys (first: vae2llm.weight_renamed)" in message


def test_a_wrong_shape_is_an_error_naming_the_tensor(model_copy):
    path = model_copy / "ae.safetensors"
    state = load_file(str(path))
    state["decoder.conv_in.bias"] = torch.zeros(7)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"ae.safetensors: tensor 'decoder.conv_in.bias' has shape \(7,\)"):
        Echo4oPipeline.from_pretrained(model_copy, device="cpu")


@pytest.mark.parametrize("name", ["ema.safetensors", "vit_config.json", "merges.txt"])
def test_a_missing_file_is_an_error_naming_it(model_copy, name):
    (model_copy / name).unlink()
    with pytest.raises(CheckpointError, match=f"lacks {name}") as info:
        Echo4oPipeline.from_pretrained(model_copy, device="cpu")
    assert "download" in str(info.value)


def test_a_corrupt_weights_file_is_an_error_naming_it(model_copy):
    path = model_copy / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="ema.safetensors .* not a readable safetensors file.*download it again"):
        Echo4oPipeline.from_pretrained(model_copy, device="cpu")


def test_a_corrupt_config_is_an_error_naming_it(model_copy):
    (model_copy / "llm_config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="llm_config.json is not readable JSON"):
        Echo4oPipeline.from_pretrained(model_copy, device="cpu")


def test_a_folder_that_does_not_exist_is_an_error_with_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*make-tiny"):
        resolve_checkpoint(tmp_path / "nowhere")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_is_an_error_with_the_fix(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(CheckpointError, match="cannot fetch someone/some-model from the Hugging Face Hub") as info:
        resolve_checkpoint("someone/some-model", cache_dir=str(tmp_path / "hub"), endpoint=endpoint)
    assert "--local-dir" in str(info.value)


def test_without_ae_config_the_flux_vae_applies(model_copy):
    (model_copy / "ae_config.json").unlink()
    config = BagelConfig.from_dir(model_copy)
    assert config.vae == VAEConfig()
    assert (config.vae.ch, config.vae.ch_mult, config.vae.z_channels) == (128, (1, 2, 4, 4), 16)
    assert config.latent_downsample == 16 and config.max_image_size == 1024
    # the tiny weights no longer fit: a clear mismatch, not a crash
    with pytest.raises(CheckpointError, match="ae.safetensors"):
        load_vae(model_copy, config, torch.device("cpu"), torch.float32)


def test_ae_config_must_be_consistent(model_copy):
    data = json.loads((model_copy / "ae_config.json").read_text())
    data["downsample"] = 16
    (model_copy / "ae_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="downsample=16 but ch_mult"):
        read_config(model_copy)


def test_vit_config_counts_one_layer_more_than_built(tiny_model):
    data = json.loads((tiny_model / "vit_config.json").read_text())
    assert read_config(tiny_model).vit.num_hidden_layers == data["num_hidden_layers"] - 1


@pytest.mark.parametrize(("kwargs", "match"), [({"device": "tpu"}, "device"), ({"dtype": "int8"}, "dtype"),
                                               ({"device": "cuda"}, "CUDA is not available"),
                                               ({"attention": "flash_attn"}, "flash_attn")])
def test_bad_load_options_are_value_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Echo4oPipeline.from_pretrained(tiny_model, **{"device": "cpu", **kwargs})


def test_accelerate_placement_gives_the_same_result(tiny_model):
    config = read_config(tiny_model)
    device_map = auto_device_map(config, torch.float32, max_memory={"cpu": "1GiB"})
    assert device_map  # every module placed
    plain = Echo4oPipeline.from_pretrained(tiny_model, device="cpu", device_map=None)
    placed = Echo4oPipeline.from_pretrained(tiny_model, device="cpu", device_map=device_map)
    kwargs = {"height": 32, "width": 32, "num_steps": 3, "seed": 1, "output_type": "latent"}
    assert torch.equal(plain("a cat", **kwargs).images[0], placed("a cat", **kwargs).images[0])


def test_a_corrupt_tokenizer_is_a_checkpoint_error(model_copy):
    (model_copy / "tokenizer_config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="tokenizer"):
        Echo4oPipeline.from_pretrained(model_copy, device="cpu")
