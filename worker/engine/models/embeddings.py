"""Position and timestep embeddings and the ViT-to-LLM connector of BAGEL."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from transformers.activations import ACT2FN


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``(M, dim)`` table: ``sin(p * w_k)`` then ``cos(p * w_k)``, ``w_k = 10000^(-2k/dim)``, in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """``(grid_size**2, dim)`` table for a square grid, row-major: first half encodes the column, second the row."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32),
                             indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


class PositionEmbedding(nn.Module):
    """Fixed 2D sin-cos table over a ``max_num_patch_per_side``-square grid, indexed by ``row * side + col``.

    The table is a (frozen) parameter because the released checkpoint stores it as ``*.pos_embed``.
    """

    def __init__(self, max_num_patch_per_side: int, hidden_size: int):
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.hidden_size = hidden_size
        self.pos_embed = nn.Parameter(torch.zeros(max_num_patch_per_side**2, hidden_size), requires_grad=False)

    def reset_table(self) -> None:
        table = sincos_2d(self.hidden_size, self.max_num_patch_per_side)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(table).float())

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def flattened_position_ids(height: int, width: int, patch_size: int, max_per_side: int) -> torch.Tensor:
    """Grid index ``row * max_per_side + col`` of every ``patch_size`` patch of an image, row-major."""
    rows = torch.arange(height // patch_size)
    cols = torch.arange(width // patch_size)
    return (rows[:, None] * max_per_side + cols).flatten()


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding: 256 sinusoidal frequencies (cos first), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequencies(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class MLPConnector(nn.Module):
    """ViT width -> LLM width: Linear, activation, Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_act: str):
        super().__init__()
        self.activation_fn = ACT2FN[hidden_act]
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))
