"""Our model against the tensor names of the RELEASED BAGEL-7B-MoT ``ema.safetensors``, not only against files
our own model class wrote.

``fixtures/released_ema_keys.json`` lists every tensor name and shape of the released file with the released
configs, taken from the public reference model's ``state_dict`` on the meta device (how: see
``fixtures/list_released_keys.py``). Our loader reads ``ema.safetensors`` without renaming, so the model must
have exactly those names; and a checkpoint whose keys are the fixture's (shapes scaled to a tiny width, the
real 28 + 26 layer counts kept) must load through ``Echo4oPipeline.from_pretrained`` with every tensor in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from worker.engine import Echo4oPipeline
from worker.engine.config import BagelConfig, VAEConfig, llm_config_from_dict, vit_config_from_dict
from worker.engine.models.bagel import Bagel

FIXTURE = Path(__file__).parent / "fixtures" / "released_ema_keys.json"

# Tiny widths for the released model's, keeping its structure (GQA 2:1 here, head dim 16).
TINY_LLM_WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_VIT_WIDTHS = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def released() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_the_fixture_is_the_7b_mot_release(released):
    """The fixture is the 7B MoT release: 28 MoT layers with both experts, 26 of SigLIP so400m's 27 layers."""
    names = released["tensors"]
    llm_layers = {int(n.split(".")[3]) for n in names if n.startswith("language_model.model.layers.")}
    vit_layers = {int(n.split(".")[4]) for n in names if n.startswith("vit_model.vision_model.encoder.layers.")}
    assert llm_layers == set(range(28)) and vit_layers == set(range(26))
    assert names["language_model.model.layers.27.self_attn.q_proj_moe_gen.weight"] == [3584, 3584]
    assert names["language_model.model.layers.0.self_attn.k_proj.weight"] == [512, 3584]  # 4 KV heads x 128
    assert names["vit_model.vision_model.embeddings.patch_embedding.weight"] == [1152, 588]  # conv as a Linear
    assert names["latent_pos_embed.pos_embed"] == [4096, 3584] and names["vit_pos_embed.pos_embed"] == [4900, 3584]
    assert len(names) == 1223


def test_our_model_has_exactly_the_released_names_and_shapes(released):
    config = BagelConfig(llm=llm_config_from_dict(released["llm_config"]),
                         vit=vit_config_from_dict(released["vit_config"]), vae=VAEConfig())
    with torch.device("meta"):
        model = Bagel(config)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    theirs = released["tensors"]
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not extra, f"not built by us: {missing[:5]}; not in the release: {extra[:5]}"
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not wrong, wrong


def _tiny_dims(released: dict, vocab_size: int) -> dict[int, int]:
    """Each width of the release -> the tiny model's (a released dimension has one meaning in the file)."""
    llm, vit = released["llm_config"], released["vit_config"]
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    tiny_head = TINY_LLM_WIDTHS["hidden_size"] // TINY_LLM_WIDTHS["num_attention_heads"]
    dims = {
        llm["hidden_size"]: TINY_LLM_WIDTHS["hidden_size"],
        llm["intermediate_size"]: TINY_LLM_WIDTHS["intermediate_size"],
        llm["vocab_size"]: vocab_size,
        head_dim: tiny_head,
        llm["num_key_value_heads"] * head_dim: TINY_LLM_WIDTHS["num_key_value_heads"] * tiny_head,
        vit["hidden_size"]: TINY_VIT_WIDTHS["hidden_size"],
        vit["intermediate_size"]: TINY_VIT_WIDTHS["intermediate_size"],
    }
    for same in (64, 256, 588, 4096, 4900):  # latent patch dim, timestep freqs, 3x14x14 patch, the position tables
        dims.setdefault(same, same)
    return dims


def test_a_checkpoint_with_the_released_key_names_loads_through_from_pretrained(released, tiny_model, tmp_path):
    """Every released name, at tiny width with the real layer counts, is read into the tensor of that name."""
    folder = tmp_path / "released-names"
    shutil.copytree(tiny_model, folder)
    vocab_size = json.loads((tiny_model / "llm_config.json").read_text())["vocab_size"]
    llm_json = {**released["llm_config"], **TINY_LLM_WIDTHS, "vocab_size": vocab_size}
    vit_json = {**released["vit_config"], **TINY_VIT_WIDTHS}
    (folder / "llm_config.json").write_text(json.dumps(llm_json))
    (folder / "vit_config.json").write_text(json.dumps(vit_json))

    dims = _tiny_dims(released, vocab_size)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in released["tensors"].items():
        unknown = [d for d in shape if d not in dims]
        assert not unknown, f"{name}: no tiny width for released dimension(s) {unknown}; extend _tiny_dims"
        tiny_shape = [dims[d] for d in shape]
        state[name] = torch.randn(tiny_shape, generator=generator) * tiny_shape[-1] ** -0.5
    save_file(state, str(folder / "ema.safetensors"))

    pipe = Echo4oPipeline.from_pretrained(folder, device="cpu", dtype="float32", device_map=None)
    loaded = pipe.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    assert len(pipe.model.language_model.model.layers) == 28
    assert len(pipe.model.vit_model.vision_model.encoder.layers) == 26
    # the loaded model runs (a latent out of a reference image and a prompt)
    from PIL import Image

    out = pipe("a cat", images=[Image.new("RGB", (32, 32), (200, 30, 30))], height=32, width=32, num_steps=2,
               seed=0, output_type="latent")
    assert out.images[0].shape == (4, 64) and torch.isfinite(out.images[0]).all()
