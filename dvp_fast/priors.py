"""Alternative priors of the ablations and baselines: a mixture of Gaussians over u (Fig. 5)
and the top-layer VampPrior with learnable pseudo-images (Table 6)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops.gaussian_kl import LOG_2PI


class MoGPrior(nn.Module):
    """p(u) = sum_k pi_k N(u; m_k, diag(e^{lv_k})), all learnable."""

    def __init__(self, shape: tuple[int, int, int], components: int):
        super().__init__()
        self.shape = shape
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(0.5 * torch.randn(1, components, *shape))
        self.logvars = nn.Parameter(torch.full((1, components, *shape), -2.0))

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """log p(u), (B,)."""
        u = u.float().unsqueeze(1)  # (B, 1, C, d, d)
        elem = -0.5 * (LOG_2PI + self.logvars + (u - self.means).pow(2) * torch.exp(-self.logvars))
        per_component = elem.flatten(2).sum(2) + torch.log_softmax(self.logits, 0)
        return torch.logsumexp(per_component, dim=1)

    def neg_log_prob(self, u: torch.Tensor, grid_steps: int | None = None) -> torch.Tensor:
        return -self.log_prob(u)

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, temperature: float = 1.0,
               device: torch.device | str | None = None, sampler: str | None = None, step_fn=None) -> torch.Tensor:
        """Exact draws; `steps`, `sampler` and `step_fn` exist for the diffusion prior's interface."""
        k = torch.multinomial(torch.softmax(self.logits, 0), n, replacement=True)
        means, logvars = self.means[0, k], self.logvars[0, k]
        return means + math.sqrt(temperature) * torch.exp(0.5 * logvars) * torch.randn_like(means)


class VampPseudoImages(nn.Module):
    """K learnable pseudo-images in [-1, 1] (hardtanh of free parameters)."""

    def __init__(self, count: int, shape: tuple[int, int, int]):
        super().__init__()
        self.raw = nn.Parameter(0.1 * torch.randn(count, *shape))

    def forward(self) -> torch.Tensor:
        return torch.nn.functional.hardtanh(self.raw)


def mixture_log_prob(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k N(z; means_k, e^{logvars_k}) per row: z (B, ...), means/logvars (K, ...) -> (B,)."""
    z = z.float().flatten(1).unsqueeze(1)  # (B, 1, M)
    means, logvars = means.float().flatten(1).unsqueeze(0), logvars.float().flatten(1).unsqueeze(0)
    per_component = (-0.5 * (LOG_2PI + logvars + (z - means).pow(2) * torch.exp(-logvars))).sum(2)  # (B, K)
    return torch.logsumexp(per_component, dim=1) - math.log(means.shape[1])
