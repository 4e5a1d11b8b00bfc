"""SigLIP NaViT vision encoder: images of any size as packed variable-length patch sequences.

The patch convolution is stored as a Linear over flattened ``(p, q, channel)`` patches, positions come from
SigLIP's learned table indexed by ``row * side + col``, and attention is full inside each image. The MLP is
transformers' ``SiglipMLP``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipMLP

from worker.engine.attention import packed_attention


class SiglipNaViTEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        side = config.image_size // config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=True)
        self.position_embedding = nn.Embedding(side * side, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipPackedAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, backend: str) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        out = packed_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, False, backend)
        return self.out_proj(out.reshape(n, -1))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipPackedAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, backend: str) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen, backend)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, backend: str) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen, backend)
        return x


class SiglipNaViTTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipNaViTEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, backend: str) -> torch.Tensor:
        x = self.embeddings(patches, position_ids)
        x = self.encoder(x, cu_seqlens, max_seqlen, backend)
        return self.post_layernorm(x)


class SiglipNaViTModel(nn.Module):
    """``vision_model`` wrapper, so parameter names match the released ``vit_model.vision_model.*`` keys."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipNaViTTransformer(config)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, backend: str = "sdpa") -> torch.Tensor:
        return self.vision_model(patches, position_ids, cu_seqlens, max_seqlen, backend)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(C, H, W)`` -> ``(H/p * W/p, p * p * C)``, patches row-major, features in ``(p, q, c)`` order."""
    c, h, w = image.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
    x = image.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)
