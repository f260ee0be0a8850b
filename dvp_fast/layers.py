"""Convolutional building blocks of the ladder (SPEC §5 and §6)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops


class Conv1x1(nn.Conv2d):
    """A 1x1 convolution, optionally of SiLU(x), through `dvp_fast.ops.conv1x1` (fused on CPU).

    With `silu_input` the SiLU before the conv is computed inside it and never stored.
    """

    def __init__(self, cin: int, cout: int, silu_input: bool = False):
        super().__init__(cin, cout, 1)
        self.silu_input = silu_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv1x1(x, self.weight, self.bias, silu=self.silu_input)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu_input=True" if self.silu_input else "")


def conv1x1(cin: int, cout: int, silu_input: bool = False) -> Conv1x1:
    return Conv1x1(cin, cout, silu_input)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class EncoderResBlock(nn.Module):
    """Pre-activation bottleneck: x + [SiLU, 1x1, SiLU, 3x3, SiLU, 3x3, SiLU, 1x1](x).

    The SiLUs before the 1x1 convs run inside them (silu_input); the Identity slots keep the
    parameter names (net.1, net.3, ...) of checkpoints written before that.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Identity(), conv1x1(channels, hidden, silu_input=True),
            nn.SiLU(), conv3x3(hidden, hidden),
            nn.SiLU(), conv3x3(hidden, hidden),
            nn.Identity(), conv1x1(hidden, channels, silu_input=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class DecoderResBlock(nn.Module):
    """Post-activation bottleneck: skip(x) + [1x1, SiLU, 3x3, SiLU, 3x3, SiLU, 1x1](x).

    skip is the identity when cin == cout, else a 1x1 conv. `last_scale` multiplies
    the last conv's initial weight (0 zero-initialises it, weight and bias). The last SiLU
    runs inside the last conv (silu_input; the Identity slot keeps the parameter names).
    """

    def __init__(self, cin: int, hidden: int, cout: int, last_scale: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(
            conv1x1(cin, hidden), nn.SiLU(),
            conv3x3(hidden, hidden), nn.SiLU(),
            conv3x3(hidden, hidden), nn.Identity(),
            conv1x1(hidden, cout, silu_input=True),
        )
        self.skip = nn.Identity() if cin == cout else conv1x1(cin, cout)
        last = self.net[-1]
        with torch.no_grad():
            if last_scale == 0.0:
                last.weight.zero_()
                last.bias.zero_()
            else:
                last.weight.mul_(last_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.net(x)


class Encoder(nn.Module):
    """Bottom-up encoder: one feature map per latent scale, finest first.

    A 1x1 conv lifts the image to `num_ch` channels; each scale runs
    `blocks_per_scale` residual blocks then average-pools by 2 (by 1 for the first
    scale when it sits at the image's resolution).
    """

    def __init__(self, in_ch: int, num_ch: int, hidden: int, blocks_per_scale: int, pools: list[int]):
        super().__init__()
        self.pre_process = conv1x1(in_ch, num_ch)
        self.scales = nn.ModuleList(
            nn.Sequential(*[EncoderResBlock(num_ch, hidden) for _ in range(blocks_per_scale)]) for _ in pools
        )
        self.pools = pools

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.pre_process(x)
        feats = []
        for blocks, pool in zip(self.scales, self.pools):
            h = blocks(h)
            if pool > 1:
                h = nn.functional.avg_pool2d(h, pool)
            feats.append(h)
        return feats


def scaled_init_factor(num_latents: int) -> float:
    """The 1/sqrt(L) factor applied to the state-update convs at initialisation."""
    return math.sqrt(1.0 / num_latents)
