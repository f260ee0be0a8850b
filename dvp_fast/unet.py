"""The small UNet that predicts eps for the diffusion prior over u (SPEC §9).

One resolution level (channel_mult [1]): input conv, `res_blocks` ResBlocks, a
middle ResBlock-Attention-ResBlock, (res_blocks + 1) output ResBlocks on the
concatenated skips, then GroupNorm, SiLU and a zero-initialised conv. ResBlocks
use scale-shift FiLM of a time embedding; t in [0, 1] is embedded directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = GroupNorm32(groups, cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1.0 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the d*d positions, residual, zero-initialised output."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x).reshape(b, c, h * w)).chunk(3, dim=1)  # (B, C, N) each
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj_out(a.transpose(1, 2)).reshape(b, c, h, w)


class UNet(nn.Module):
    def __init__(self, channels: int, model_channels: int, res_blocks: int, dropout: float = 0.0,
                 groups: int = 16):
        super().__init__()
        mc = model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, mc), nn.SiLU(), nn.Linear(mc, mc))
        self.input_conv = nn.Conv2d(channels, mc, 3, padding=1)
        block = lambda cin: ResBlock(cin, mc, mc, groups, dropout)
        self.input_blocks = nn.ModuleList(block(mc) for _ in range(res_blocks))
        self.middle = nn.ModuleList([block(mc), AttentionBlock(mc, groups), block(mc)])
        self.output_blocks = nn.ModuleList(block(2 * mc) for _ in range(res_blocks + 1))
        self.out = nn.Sequential(GroupNorm32(groups, mc), nn.SiLU(), _zero(nn.Conv2d(mc, channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps-prediction for noisy inputs x (B, C, d, d) at times t (B,) in [0, 1]."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = self.input_conv(x)
        skips = [h]
        for blk in self.input_blocks:
            h = blk(h, emb)
            skips.append(h)
        h = self.middle[0](h, emb)
        h = self.middle[1](h)
        h = self.middle[2](h, emb)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
