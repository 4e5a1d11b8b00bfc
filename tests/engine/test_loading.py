"""Checkpoint loading: strict keys, clear errors for renamed keys, missing or corrupt files and an unreachable Hub;
configs (ae_config.json optional); the tiny-model writer."""

from __future__ import annotations

import json
import re
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
from worker.engine.models.bagel import Bagel
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


def test_a_cpu_device_map_places_every_module_as_asked_and_changes_no_number(tiny_model):
    """On a machine without a GPU a device map can only name the CPU, so this checks the placement path itself
    (per-module device lookup, tensors read on the host, accelerate's dispatch), not a spread over devices:
    every parameter and buffer lands on the device its longest map prefix names, the weights are the file's,
    and a call gives bit-for-bit the latents of the single-device load."""
    config = read_config(tiny_model)
    device_map = {"": "cpu", "language_model.model.layers.0": "cpu", "language_model.model.layers.1": "cpu",
                  "vit_model": torch.device("cpu")}
    plain = Echo4oPipeline.from_pretrained(tiny_model, device="cpu", device_map=None)
    placed = Echo4oPipeline.from_pretrained(tiny_model, device="cpu", device_map=device_map)
    assert not any(t.is_meta for t in (*placed.model.parameters(), *placed.model.buffers()))
    for name, tensor in (*placed.model.named_parameters(), *placed.model.named_buffers()):
        prefix = max((k for k in device_map if k == "" or name.startswith(k + ".")), key=len)
        assert tensor.device == torch.device(device_map[prefix]), name
    plain_state, placed_state = plain.model.state_dict(), placed.model.state_dict()
    assert set(placed_state) == set(plain_state) == set(load_file(str(tiny_model / "ema.safetensors")))
    assert all(torch.equal(placed_state[k], plain_state[k]) for k in plain_state)
    kwargs = {"height": 32, "width": 32, "num_steps": 3, "seed": 1, "output_type": "latent"}
    assert torch.equal(plain("a cat", **kwargs).images[0], placed("a cat", **kwargs).images[0])
    assert config.llm.num_hidden_layers == 2  # the map above names each decoder layer of the tiny model


def test_auto_device_map_keeps_layers_whole_and_the_shared_modules_on_the_first_gpu(tiny_model):
    """auto_device_map for cards too small for the model, computed without the cards (accelerate only reads
    max_memory): decoder layers go to different devices but none is split, and the embeddings, heads and
    encoders, which every step touches, all sit on the first GPU that received anything."""
    config = read_config(tiny_model)
    with torch.device("meta"):
        model = Bagel(config)
    total = sum(p.numel() * 4 for p in model.parameters())
    layer = sum(p.numel() * 4 for p in model.language_model.model.layers[0].parameters())
    device_map = auto_device_map(config, torch.float32, max_memory={0: int(0.4 * total), 1: layer * 3 // 2,
                                                                    "cpu": 2**34})
    layer_prefix = re.compile(r"^(language_model\.model\.layers|vit_model\.vision_model\.encoder\.layers)\.\d+\.")
    assert not [k for k in device_map if layer_prefix.match(k)], device_map  # no layer split into parts
    layers = {k: d for k, d in device_map.items() if k.startswith("language_model.model.layers")}
    assert len(set(layers.values())) >= 2, device_map  # the decoder is spread
    shared = ["language_model.model.embed_tokens", "language_model.model.norm", "language_model.model.norm_moe_gen",
              "language_model.lm_head", "time_embedder", "vae2llm", "llm2vae", "latent_pos_embed", "vit_model",
              "connector", "vit_pos_embed"]
    assert {device_map[name] for name in shared} == {0}, device_map
    # every parameter is covered by exactly one entry's prefix
    for name, _ in model.named_parameters():
        owners = [k for k in device_map if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)


def test_disk_offload_in_a_device_map_is_refused(tiny_model):
    config = read_config(tiny_model)
    with pytest.raises(CheckpointError, match="disk offload is not supported"):
        load_bagel(tiny_model, config, torch.device("cpu"), torch.float32,
                   device_map={"": "cpu", "vit_model": "disk"})


@pytest.mark.gpu
def test_a_model_spread_over_gpu_and_cpu_runs_where_asked_and_matches_one_device(tiny_model):
    """A real spread: decoder layer 1 on the CPU, everything else on the GPU; each module is where the map
    says, and the latents equal the single-GPU ones up to float32 kernel differences."""
    device_map = {"": 0, "language_model.model.layers.1": "cpu"}
    one = Echo4oPipeline.from_pretrained(tiny_model, device="cuda", dtype="float32", device_map=None)
    spread = Echo4oPipeline.from_pretrained(tiny_model, device="cuda", dtype="float32", device_map=device_map)
    layers = spread.model.language_model.model.layers
    assert {p.device.type for p in layers[0].parameters()} == {"cuda"}
    assert {p.device.type for p in spread.model.vae2llm.parameters()} == {"cuda"}
    # accelerate keeps CPU-mapped weights on the CPU and moves them per forward
    assert all(p.device.type in ("cpu", "meta") for p in layers[1].parameters())
    kwargs = {"height": 32, "width": 32, "num_steps": 3, "seed": 1, "output_type": "latent"}
    a, b = one("a cat", **kwargs).images[0], spread("a cat", **kwargs).images[0]
    assert (a - b).abs().max() < 1e-4


def test_a_corrupt_tokenizer_is_a_checkpoint_error(model_copy):
    (model_copy / "tokenizer_config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="tokenizer"):
        Echo4oPipeline.from_pretrained(model_copy, device="cpu")
