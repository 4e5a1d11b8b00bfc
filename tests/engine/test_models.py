"""The networks: position tables, expert routing, KV-cache prefill, packed CFG branches, VAE key mapping."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine.config import BagelConfig, VAEConfig, llm_config_from_dict, vit_config_from_dict
from worker.engine.models.bagel import Bagel, SpecialTokens
from worker.engine.models.embeddings import PositionEmbedding, TimestepEmbedder, flattened_position_ids, sincos_2d
from worker.engine.models.qwen2_mot import UND, KVCache, PrefillPlan, Route
from worker.engine.models.siglip_navit import patchify
from worker.engine.models.vae import FluxVAE, diffusers_to_flux_key, flux_to_diffusers_key
from worker.engine.tiny import TINY_LLM, TINY_VAE, TINY_VIT, _randomize

SPECIAL = SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)


@pytest.fixture(scope="module")
def model() -> Bagel:
    torch.manual_seed(0)
    config = BagelConfig(llm=llm_config_from_dict({**TINY_LLM, "vocab_size": 64}),
                         vit=vit_config_from_dict(TINY_VIT), vae=TINY_VAE)
    m = Bagel(config)
    _randomize(m, torch.Generator().manual_seed(0))
    m.reset_position_tables()
    return m.eval()


def test_sincos_table_first_half_encodes_the_column_second_half_the_row():
    dim, side = 8, 5
    table = torch.from_numpy(sincos_2d(dim, side))
    row, col = 3, 2
    omega = [1.0, 0.01]  # 10000 ** (-k / (dim / 4)) for k = 0, 1 with dim / 4 = 2
    expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
    assert torch.allclose(table[row * side + col], torch.tensor(expected, dtype=torch.float64))
    emb = PositionEmbedding(side, dim)
    emb.reset_table()
    assert torch.equal(emb(torch.tensor([row * side + col]))[0], table[row * side + col].float())


def test_flattened_position_ids_index_a_wider_grid():
    assert flattened_position_ids(32, 48, 16, 64).tolist() == [0, 1, 2, 64, 65, 66]


def test_timestep_embedding_frequencies_cos_then_sin():
    t = torch.tensor([0.5])
    freq = TimestepEmbedder.frequencies(t, 4)
    expected = [math.cos(0.5), math.cos(0.5 * 0.01), math.sin(0.5), math.sin(0.5 * 0.01)]
    assert torch.allclose(freq[0], torch.tensor(expected), atol=1e-7)


def test_patchify_orders_features_row_column_channel():
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    tokens = patchify(image, 2)
    assert tokens.shape == (4, 8)
    # token 1 = patch (row 0, col 1); features (p, q, c): pixel (0, 2) c0, c1, pixel (0, 3) c0, c1, ...
    assert tokens[1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]


def test_latent_pack_and_unpack_are_inverse(model):
    latent = torch.randn(16, 4, 6)
    tokens = model.pack_latent(latent)
    assert tokens.shape == (6, 64)
    assert torch.equal(model.unpack_latent(tokens, (2, 3))[0], latent)


def _copy_gen_into_und(model: Bagel) -> Bagel:
    import copy

    clone = copy.deepcopy(model)
    state = clone.state_dict()
    for name in list(state):
        if "_moe_gen" in name:
            state[name.replace("_moe_gen", "")] = state[name]
    clone.load_state_dict(state)
    return clone


def test_route_sends_latent_rows_through_the_generation_expert(model):
    """A mixed route equals the all-understanding path of a model whose plain weights are the gen expert's,
    on the rows routed to the expert; the experts really differ."""
    llm = model.language_model.model
    x = torch.randn(5, model.hidden_size)
    rope = llm.rope(torch.zeros(5, dtype=torch.long))
    gen_rows = torch.tensor([1, 2, 3])
    mixed = llm(x, rope, PrefillPlan(KVCache(2), 5, False, "sdpa", x.device),
                Route(und=torch.tensor([0, 4]), gen=gen_rows))
    all_gen = llm(x, rope, PrefillPlan(KVCache(2), 5, False, "sdpa", x.device), Route(gen=torch.arange(5)))
    swapped = _copy_gen_into_und(model).language_model.model
    via_und = swapped(x, rope, PrefillPlan(KVCache(2), 5, False, "sdpa", x.device), UND)
    assert torch.allclose(all_gen, via_und, atol=1e-5)
    plain = llm(x, rope, PrefillPlan(KVCache(2), 5, False, "sdpa", x.device), UND)
    assert not torch.allclose(plain, all_gen, atol=1e-3)
    # with full attention every row depends on all rows, so only the routing of each row differs:
    assert not torch.allclose(mixed, all_gen, atol=1e-3) and not torch.allclose(mixed, plain, atol=1e-3)


def test_text_prefill_in_two_parts_equals_one_part(model):
    """Causal attention aligned bottom-right: appending to the cache gives the keys/values of one pass."""
    with torch.inference_mode():
        one, two = model.new_cache(), model.new_cache()
        # one pass over [bos 5 6 7 eos bos 8 9 eos] vs two passes over [bos 5 6 7 eos] and [bos 8 9 eos]
        model.prefill_text(one, [5, 6, 7, 2, 1, 8, 9], SPECIAL, "sdpa")
        model.prefill_text(two, [5, 6, 7], SPECIAL, "sdpa")
        model.prefill_text(two, [8, 9], SPECIAL, "sdpa")
    assert two.length == one.length == 9 and two.rope == one.rope == 9
    for layer in range(2):
        assert torch.allclose(one.keys[layer], two.keys[layer], atol=1e-5)
        assert torch.allclose(one.values[layer], two.values[layer], atol=1e-5)


def test_images_take_one_rope_position_and_their_tokens(model):
    with torch.inference_mode():
        cache = model.new_cache()
        model.prefill_text(cache, [5, 6], SPECIAL, "sdpa")
        model.prefill_vit_image(cache, torch.randn(3, 28, 42), SPECIAL, "sdpa")
        model.prefill_vae_image(cache, torch.randn(16, 4, 6), SPECIAL, "sdpa")
    assert cache.length == 4 + (2 * 3 + 2) + (2 * 3 + 2)
    assert cache.rope == 4 + 1 + 1
    assert cache.keys[0].shape == (cache.length, 2, 16)


def test_packed_branches_equal_separate_velocity_calls(model):
    with torch.inference_mode():
        full, empty = model.new_cache(), model.new_cache()
        model.prefill_text(full, [5, 6, 7], SPECIAL, "sdpa")
        grid = (2, 3)
        pos = model.latent_position_ids(grid)
        frame = (model.embed_ids([3]), model.embed_ids([4]))
        x, t = torch.randn(6, 64), torch.tensor(0.7)
        both = model.velocity(x, t, model.denoise_layout([full, empty], 6, "sdpa"), frame, pos)
        a = model.velocity(x, t, model.denoise_layout([full], 6, "sdpa"), frame, pos)
        b = model.velocity(x, t, model.denoise_layout([empty], 6, "sdpa"), frame, pos)
        # the preallocated buffers are rewritten, not appended to, on the next step
        layout = model.denoise_layout([full], 6, "sdpa")
        model.velocity(torch.randn(6, 64), t, layout, frame, pos)
        again = model.velocity(x, t, layout, frame, pos)
    assert both.shape == (2, 6, 64)
    assert torch.allclose(both[0], a[0], atol=1e-5) and torch.allclose(both[1], b[0], atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.allclose(again, a, atol=1e-6)


def test_vae_key_renames_round_trip_and_follow_flux_names():
    vae = FluxVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1))
    n = vae.num_levels
    flux = vae.flux_state_dict_keys()
    assert "decoder.up.0.block.1.conv1.weight" in flux  # top level (full resolution) is up.0 in FLUX
    assert flux_to_diffusers_key("decoder.up.0.block.1.conv1.weight", n) == "decoder.up_blocks.2.resnets.1.conv1.weight"
    assert flux_to_diffusers_key("encoder.down.1.block.0.nin_shortcut.bias", n) == \
        "encoder.down_blocks.1.resnets.0.conv_shortcut.bias"
    assert flux_to_diffusers_key("encoder.mid.attn_1.proj_out.weight", n) == \
        "encoder.mid_block.attentions.0.to_out.0.weight"
    for key in vae.autoencoder.state_dict():
        assert flux_to_diffusers_key(diffusers_to_flux_key(key, n), n) == key


def test_vae_shapes_and_seeded_posterior_sample():
    vae = FluxVAE(TINY_VAE)
    _randomize(vae, torch.Generator().manual_seed(1))
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.inference_mode():
        z1 = vae.encode(image, torch.Generator().manual_seed(3))
        z2 = vae.encode(image, torch.Generator().manual_seed(3))
        z3 = vae.encode(image, torch.Generator().manual_seed(4))
        decoded = vae.decode(z1)
    assert z1.shape == (1, 16, 4, 6)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    assert decoded.shape == (1, 3, 32, 48)
