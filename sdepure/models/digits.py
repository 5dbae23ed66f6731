"""Small eps-networks for the embedded 8x8 digits default (trained by `sdepure train digits`)."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """[cos, sin] sinusoidal embedding of t * scale (t in [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(t.dtype if t.is_floating_point() else torch.float32)


class _ResBlock(nn.Module):
    def __init__(self, ch: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, ch)
        self.norm2 = nn.GroupNorm(groups, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return x + h


class DigitsEpsNet(nn.Module):
    """A two-resolution (8x8, 4x4) residual conv net predicting eps; input t in [0, 1]."""

    def __init__(self, ch: int = 64, blocks: int = 2, emb_dim: int = 128, in_ch: int = 1):
        super().__init__()
        self.config = {"ch": ch, "blocks": blocks, "emb_dim": emb_dim, "in_ch": in_ch}
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList([_ResBlock(ch, emb_dim) for _ in range(blocks)])
        self.pool = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([_ResBlock(2 * ch, emb_dim) for _ in range(blocks)])
        self.upsample = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
        self.merge = nn.Conv2d(2 * ch, ch, 1)
        self.up = nn.ModuleList([_ResBlock(ch, emb_dim) for _ in range(blocks)])
        self.out_norm = nn.GroupNorm(8, ch)
        self.out = nn.Conv2d(ch, in_ch, 3, padding=1)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype))
        h = self.inp(x)
        for b in self.down:
            h = b(h, emb)
        skip = h
        h = self.pool(h)
        for b in self.mid:
            h = b(h, emb)
        h = self.merge(torch.cat([self.upsample(h), skip], dim=1))
        for b in self.up:
            h = b(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))


class DigitsEpsMLP(nn.Module):
    """A residual MLP on the flattened 8x8 image predicting eps; input t in [0, 1]."""

    def __init__(self, width: int = 512, blocks: int = 4, emb_dim: int = 128, dim: int = 64, dropout: float = 0.0):
        super().__init__()
        self.config = {"width": width, "blocks": blocks, "emb_dim": emb_dim, "dim": dim, "dropout": dropout}
        self.drop = nn.Dropout(dropout)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(blocks)])
        self.fc1 = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.fc2 = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x, t):
        shape = x.shape
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype))
        h = self.inp(x.reshape(shape[0], -1))
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = h + fc2(self.drop(nn.functional.silu(fc1(nn.functional.silu(norm(h)) + emb))))
        return self.out(nn.functional.silu(self.out_norm(h))).reshape(shape)
