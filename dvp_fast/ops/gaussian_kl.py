"""Reparameterised sample of a diagonal Gaussian posterior and its KL to a diagonal Gaussian prior.

For q = N(mu_q, e^{logvar_q}) and p = N(mu_p, e^{logvar_p}), per element:
    z  = mu_q + e^{logvar_q / 2} * eps
    KL = 1/2 (logvar_p - logvar_q + (e^{logvar_q} + (mu_q - mu_p)^2) e^{-logvar_p} - 1)
and the returned kl is the sum over every non-batch dimension, shape (B,).
"""
from __future__ import annotations

import math

import torch

from ._backend import choose_backend, implementation
from ._checks import check_floating, check_nonempty, check_same_device, check_same_shape

LOG_2PI = math.log(2.0 * math.pi)


def _check_args(mu_q, logvar_q, mu_p, logvar_p, noise) -> None:
    named = dict(mu_q=mu_q, logvar_q=logvar_q, mu_p=mu_p, logvar_p=logvar_p)
    if noise is not None:
        named["noise"] = noise
    for name, t in named.items():
        check_floating("gaussian_sample_kl", name, t)
    check_same_shape("gaussian_sample_kl", **named)
    check_same_device("gaussian_sample_kl", **named)
    if mu_q.dim() < 1:
        raise ValueError("gaussian_sample_kl: inputs need a leading batch dimension, got a scalar")
    check_nonempty("gaussian_sample_kl", "mu_q", mu_q)


def gaussian_sample_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor,
                       noise: torch.Tensor | None = None, *, backend: str = "auto"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl): z (B, ...) ~ q by reparameterisation, kl (B,) = KL(q || p) summed per batch row.

    `noise` is the standard-normal eps; when omitted it is drawn from torch's RNG
    (inside the kernel for the fused backends). Gradients flow to all four inputs.
    """
    _check_args(mu_q, logvar_q, mu_p, logvar_p, noise)
    fn = implementation("gaussian_sample_kl", choose_backend("gaussian_sample_kl", backend, mu_q.device))
    return fn(mu_q, logvar_q, mu_p, logvar_p, noise)


def gaussian_sample_kl_grouped(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                               *, backend: str = "auto") -> tuple[list[torch.Tensor], torch.Tensor]:
    """All layers of a forward pass at once: ([z_l], kl (B, L)).

    The fused backends do this in one launch; the fallback loops over layers.
    """
    if not layers:
        raise ValueError("gaussian_sample_kl_grouped: expected at least one layer")
    for i, layer in enumerate(layers):
        if len(layer) != 4:
            raise ValueError(f"gaussian_sample_kl_grouped: layer {i} must be (mu_q, logvar_q, mu_p, logvar_p), "
                             f"got {len(layer)} items")
        _check_args(*layer, None)
    first = layers[0][0]
    for i, layer in enumerate(layers[1:], 1):
        if layer[0].shape[0] != first.shape[0] or layer[0].device != first.device:
            raise ValueError(f"gaussian_sample_kl_grouped: every layer must share layer 0's batch size and device "
                             f"({first.shape[0]} on {first.device}), layer {i} has {layer[0].shape[0]} on "
                             f"{layer[0].device}")
    fn = implementation("gaussian_sample_kl_grouped",
                        choose_backend("gaussian_sample_kl_grouped", backend, layers[0][0].device))
    return fn(layers)


def gaussian_sample_kl_torch(mu_q, logvar_q, mu_p, logvar_p, noise=None):
    mu_q32, lv_q, mu_p32, lv_p = (t.float() for t in (mu_q, logvar_q, mu_p, logvar_p))
    if noise is None:
        noise = torch.randn_like(mu_q32)
    z = mu_q32 + torch.exp(0.5 * lv_q) * noise.float()
    kl = 0.5 * (lv_p - lv_q + (torch.exp(lv_q) + (mu_q32 - mu_p32) ** 2) * torch.exp(-lv_p) - 1.0)
    return z.to(mu_q.dtype), kl.reshape(kl.shape[0], -1).sum(1)  # reshape: 1-D (B,) inputs too


def gaussian_sample_kl_grouped_torch(layers):
    results = [gaussian_sample_kl_torch(*layer) for layer in layers]
    return [z for z, _ in results], torch.stack([kl for _, kl in results], dim=1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, e^logvar) summed over every non-batch dimension, (B,)."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    elem = -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))
    return elem.reshape(elem.shape[0], -1).sum(1)
