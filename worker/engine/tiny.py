"""A random-weight tiny Echo-4o in the released checkpoint layout (a few MB), for tests and demos.

Same architecture and file layout as the real model (``llm_config.json``, ``vit_config.json``,
``ema.safetensors``, ``ae.safetensors`` with FLUX key names, Qwen2-format tokenizer files) plus
``ae_config.json`` for its small VAE, so it loads through exactly the code that loads real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from echo4o.logging import get_logger
from worker.engine.config import (
    AE_CONFIG,
    AE_WEIGHTS,
    EMA_WEIGHTS,
    LLM_CONFIG,
    VIT_CONFIG,
    BagelConfig,
    VAEConfig,
    llm_config_from_dict,
    vit_config_from_dict,
)
from worker.engine.models.bagel import Bagel
from worker.engine.models.vae import FluxVAE, diffusers_to_flux_key, diffusers_to_flux_tensor
from worker.engine.tokenizer import build_tiny_tokenizer, load_tokenizer

log = get_logger(__name__)

TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head dim 16
    "num_key_value_heads": 2,  # grouped-query attention, as the real model
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}
TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,  # the loader builds num_hidden_layers - 1 = 2, as for the real model
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": 980,  # 70 x 70 patch positions, as SigLIP-so400m-14-980
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}
TINY_VAE = VAEConfig(resolution=256, in_channels=3, ch=32, out_ch=3, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                     z_channels=16, scale_factor=0.3611, shift_factor=0.1159)
TOKENIZER_VOCAB = 1024


def write_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to ``out_dir`` (created if needed) and return it. Same seed, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    build_tiny_tokenizer(out, vocab_size=TOKENIZER_VOCAB)
    tokenizer, special = load_tokenizer(out)
    vocab_size = -(-len(tokenizer) // 64) * 64  # rows padded to a multiple of 64, as Qwen2's embedding

    llm_json = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": special["bos_token_id"], "eos_token_id": special["eos_token_id"],
        "initializer_range": 0.02, "max_window_layers": TINY_LLM["num_hidden_layers"], "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False,
        "vocab_size": vocab_size, "rope_scaling": None, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer",
        **TINY_LLM,
    }
    vit_json = {"model_type": "siglip_vision_model", **TINY_VIT}
    _write_json(out / LLM_CONFIG, llm_json)
    _write_json(out / VIT_CONFIG, vit_json)
    _write_json(out / AE_CONFIG, TINY_VAE.to_json_dict())

    config = BagelConfig(llm=llm_config_from_dict(llm_json), vit=vit_config_from_dict(vit_json), vae=TINY_VAE)
    generator = torch.Generator().manual_seed(seed)
    model = Bagel(config)
    _randomize(model, generator)
    model.reset_position_tables()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / EMA_WEIGHTS),
              metadata={"format": "pt"})

    vae = FluxVAE(config.vae)
    _randomize(vae, generator)
    n = vae.num_levels
    flux_state = {}
    for key, value in vae.autoencoder.state_dict().items():
        flux_state[diffusers_to_flux_key(key, n)] = diffusers_to_flux_tensor(key, value).contiguous()
    save_file(flux_state, str(out / AE_WEIGHTS), metadata={"format": "pt"})
    log.info("tiny model written", extra={"dir": str(out), "seed": seed, "vocab_size": vocab_size})
    return out


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic init that keeps activations O(1) and makes every weight matter: matrices and kernels
    ``N(0, 1/fan_in)``, norm scales ``1 + 0.1 N(0, 1)``, biases ``0.02 N(0, 1)``."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("pos_embed"):
                continue
            if param.dim() == 1:
                scale, offset = (0.02, 0.0) if name.endswith("bias") else (0.1, 1.0)
                value = offset + scale * torch.randn(param.shape, generator=generator)
            else:
                value = torch.randn(param.shape, generator=generator) * param[0].numel() ** -0.5
            param.copy_(value)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
