"""Configuration of the BAGEL / Echo-4o model, read from a checkpoint folder in the released layout.

``llm_config.json`` is a Qwen2 config (plus ``qk_norm`` and ``layer_module``), ``vit_config.json`` a SigLIP
vision config whose ``num_hidden_layers`` counts one layer more than the model uses (the released loader
builds ``num_hidden_layers - 1``), and the optional ``ae_config.json`` holds FLUX ``AutoEncoderParams`` fields
for VAEs that are not FLUX-sized. The remaining constants are fixed by the released model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import Qwen2Config, SiglipVisionConfig

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
AE_CONFIG = "ae_config.json"
EMA_WEIGHTS = "ema.safetensors"
AE_WEIGHTS = "ae.safetensors"


class ConfigError(ValueError):
    """A config file is missing, unreadable or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder parameters (the fields of FLUX's ``AutoEncoderParams``); defaults are FLUX's."""

    resolution: int = 256
    """Nominal training resolution; unused at inference."""
    in_channels: int = 3
    """Image channels into the encoder."""
    ch: int = 128
    """Base channel count (a multiple of 32: GroupNorm has 32 groups)."""
    out_ch: int = 3
    """Image channels out of the decoder."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per resolution level; ``len(ch_mult) - 1`` downsamplings."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has one more)."""
    z_channels: int = 16
    """Latent channels."""
    scale_factor: float = 0.3611
    """Encode: ``z = scale_factor * (sample - shift_factor)``; decode inverts it."""
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        """Spatial factor image -> latent."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @classmethod
    def from_json_file(cls, path: Path) -> VAEConfig:
        data = _read_json(path)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "ch_mult" in values:
            values["ch_mult"] = tuple(int(m) for m in values["ch_mult"])
        config = cls(**values)
        if "downsample" in data and int(data["downsample"]) != config.downsample:
            raise ConfigError(
                f"{path}: downsample={data['downsample']} but ch_mult {list(config.ch_mult)} gives "
                f"{config.downsample}; fix one of them"
            )
        if config.ch % 32:
            raise ConfigError(f"{path}: ch={config.ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        return config

    def to_json_dict(self) -> dict:
        data = asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        data["downsample"] = self.downsample
        return data


@dataclass
class BagelConfig:
    """Everything needed to build the model. ``vit`` already has the layer count actually built."""

    llm: Qwen2Config
    vit: SiglipVisionConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2
    """Latents are cut into ``p x p`` patches: one LLM token per patch."""
    max_latent_size: int = 64
    """Side of the latent position table, in tokens (64 x 16 px = 1024 px at most)."""
    vit_max_num_patch_per_side: int = 70
    """Side of the ViT position tables (70 x 14 px = 980 px)."""
    connector_act: str = "gelu_pytorch_tanh"

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token along one side (VAE stride x patch size; 16 for FLUX)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def max_image_size(self) -> int:
        return self.max_latent_size * self.latent_downsample

    @classmethod
    def from_dir(cls, path: str | Path) -> BagelConfig:
        """Read the configs of a checkpoint folder in the released layout."""
        path = Path(path)
        llm_data = _read_json(path / LLM_CONFIG)
        vit_data = _read_json(path / VIT_CONFIG)
        vae = VAEConfig.from_json_file(path / AE_CONFIG) if (path / AE_CONFIG).is_file() else VAEConfig()
        return cls(llm=llm_config_from_dict(llm_data, path / LLM_CONFIG),
                   vit=vit_config_from_dict(vit_data, path / VIT_CONFIG), vae=vae)


def llm_config_from_dict(data: dict, source: Path | str = LLM_CONFIG) -> Qwen2Config:
    """A Qwen2 config for the mixture-of-transformers LLM (q/k norm on, untied head, as the released loader)."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size"):
        if key not in data:
            raise ConfigError(f"{source}: missing {key!r}; use the llm_config.json of the released checkpoint")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    config = Qwen2Config(**data)
    config.qk_norm = True
    config.tie_word_embeddings = False
    config.layer_module = "Qwen2MoTDecoderLayer"
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"{source}: hidden_size {config.hidden_size} is not a multiple of "
                          f"num_attention_heads {config.num_attention_heads}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    return config


def vit_config_from_dict(data: dict, source: Path | str = VIT_CONFIG) -> SiglipVisionConfig:
    """A SigLIP vision config with ``num_hidden_layers - 1`` layers, as the released loader builds."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size"):
        if key not in data:
            raise ConfigError(f"{source}: missing {key!r}; use the vit_config.json of the released checkpoint")
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "model_type"}
    config = SiglipVisionConfig(**data)
    config.num_hidden_layers = config.num_hidden_layers - 1
    if config.num_hidden_layers < 1:
        raise ConfigError(f"{source}: num_hidden_layers must be at least 2 (the model uses all but the last)")
    return config


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path.name} is missing from {path.parent}; the checkpoint folder needs the released "
                          f"layout (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors, tokenizer "
                          f"files). Download it again or point to the right folder.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc}); download it again") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
