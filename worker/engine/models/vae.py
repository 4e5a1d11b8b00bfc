"""The FLUX autoencoder on diffusers' ``AutoencoderKL``, loading FLUX's ``ae.safetensors`` key names.

FLUX's encoder/decoder are diffusers' ``Encoder``/``Decoder`` with other parameter names and 1x1 convolutions
where diffusers' attention has Linear layers. :data:`FLUX_TO_DIFFUSERS` declares the renames; the 1x1 kernels
are reshaped. Encoding samples the posterior with noise drawn by the caller's CPU generator (as the reference
does), then applies FLUX's ``scale * (z - shift)``.
"""

from __future__ import annotations

import re
from functools import cache

import torch
from diffusers import AutoencoderKL
from torch import nn

from worker.engine.config import VAEConfig

# FLUX name prefix -> diffusers name prefix. {i}/{j}: block indexes kept; {ri}: decoder level, counted from the
# top in diffusers (len(ch_mult) - 1 - i); {part}: encoder or decoder. Applied to the start of each key.
FLUX_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{ri}.resnets.{j}."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{ri}.upsamplers.0."),
    ("{part}.mid.block_1.", "{part}.mid_block.resnets.0."),
    ("{part}.mid.block_2.", "{part}.mid_block.resnets.1."),
    ("{part}.mid.attn_1.norm.", "{part}.mid_block.attentions.0.group_norm."),
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.to_q."),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.to_k."),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.to_v."),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.to_out.0."),
    ("{part}.norm_out.", "{part}.conv_norm_out."),
)
# Inside residual blocks: FLUX's shortcut convolution name -> diffusers'.
SHORTCUT_RENAME = (".nin_shortcut.", ".conv_shortcut.")
# diffusers attention projections are Linear; FLUX stores them as 1x1 convolutions.
_ATTN_LINEAR = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


@cache
def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for name, group in (("i", r"\d+"), ("j", r"\d+"), ("ri", r"\d+"), ("part", "encoder|decoder")):
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile("^" + regex)


def _translate(key: str, forward: bool, num_levels: int) -> str:
    for flux, diffusers in FLUX_TO_DIFFUSERS:
        src, dst = (flux, diffusers) if forward else (diffusers, flux)
        m = _pattern(src).match(key)
        if m is None:
            continue
        groups = m.groupdict()
        if "i" in groups and "ri" in _names(dst):
            groups["ri"] = str(num_levels - 1 - int(groups["i"]))
        if "ri" in groups and "i" in _names(dst):
            groups["i"] = str(num_levels - 1 - int(groups["ri"]))
        key = dst.format(**groups) + key[m.end():]
        break
    old, new = SHORTCUT_RENAME if forward else SHORTCUT_RENAME[::-1]
    return key.replace(old, new)


def _names(template: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", template))


def flux_to_diffusers_key(key: str, num_levels: int) -> str:
    return _translate(key, True, num_levels)


def diffusers_to_flux_key(key: str, num_levels: int) -> str:
    return _translate(key, False, num_levels)


def flux_to_diffusers_tensor(diffusers_key: str, tensor: torch.Tensor) -> torch.Tensor:
    if _ATTN_LINEAR.search(diffusers_key) and tensor.dim() == 4:
        return tensor[:, :, 0, 0]
    return tensor


def diffusers_to_flux_tensor(diffusers_key: str, tensor: torch.Tensor) -> torch.Tensor:
    if _ATTN_LINEAR.search(diffusers_key) and tensor.dim() == 2:
        return tensor[:, :, None, None]
    return tensor


class FluxVAE(nn.Module):
    """FLUX VAE: ``encode(image in [-1, 1], generator) -> scaled latent``, ``decode(latent) -> image``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        n = len(config.ch_mult)
        self.autoencoder = AutoencoderKL(
            in_channels=config.in_channels,
            out_channels=config.out_ch,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.num_res_blocks,
            act_fn="silu",
            latent_channels=config.z_channels,
            norm_num_groups=32,
            sample_size=config.resolution,
            scaling_factor=config.scale_factor,
            shift_factor=config.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    @property
    def num_levels(self) -> int:
        return len(self.config.ch_mult)

    def flux_state_dict_keys(self) -> list[str]:
        return [diffusers_to_flux_key(k, self.num_levels) for k in self.autoencoder.state_dict()]

    def encode(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, z, H/8, W/8)``: a posterior sample, scaled and shifted.

        The noise is drawn on the CPU from ``generator`` in float32 (same numbers on any device).
        """
        moments = self.autoencoder.encoder(image)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        sample = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return self.config.scale_factor * (sample - self.config.shift_factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, z, h, w)`` scaled latent -> ``(B, 3, 8h, 8w)`` image in about [-1, 1]."""
        z = latent / self.config.scale_factor + self.config.shift_factor
        return self.autoencoder.decoder(z)
