"""Discretized mixture of logistics for 8-bit RGB images, in the form of the DVP-VAE authors' reference
code (its MixtureLogistic256), which the paper's CIFAR10 numbers come from.

Channel layout of `params` (B, M (3C + 1), H, W) with C = 3 and M = num_mix:
  * params[:, :M]                       mixture logits, shared by R, G and B;
  * params[:, M:] viewed as (B, 3, 3M, H, W) and split along dim 2 into
    means [0:M], log-scales [M:2M] and coupling coefficients [2M:3M].
Coefficients go through tanh; the means are coupled autoregressively,
mu_G += c0 x_R and mu_B += c1 x_R + c2 x_G; log-scales are hard-clamped to [-8, 1]
(no gradient to the raw log-scale outside the range or on its edges, as in the kernels).
Each sub-pixel's bin [x - 1/255, x + 1/255] gets the log of its logistic mass floored
at 1e-10 (no gradient where the mass is below the floor); the first and last of the
256 levels take the whole left and right tail. (PixelCNN++ instead clamps the
log-scales below at -7 only and uses the density at the bin centre where the mass
is below 1e-5.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import choose_backend, implementation
from ._checks import check_floating, check_int, check_same_device

LOG_SCALE_MIN = -8.0
LOG_SCALE_MAX = 1.0
HALF_BIN = 1.0 / 255.0
EDGE = 0.999  # |x| above this is the first or last of the 256 levels
MASS_FLOOR = 1e-10  # log(max(mass, MASS_FLOOR)) for the interior bins


def _check_args(x: torch.Tensor, params: torch.Tensor, num_mix: int) -> None:
    check_floating("dml_log_prob", "x", x)
    check_floating("dml_log_prob", "params", params)
    check_same_device("dml_log_prob", x=x, params=params)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"dml_log_prob: x must be (B, 3, H, W), got shape {tuple(x.shape)}")
    _check_params(params, num_mix, "dml_log_prob")
    if params.shape[0] != x.shape[0] or params.shape[2:] != x.shape[2:]:
        raise ValueError(f"dml_log_prob: params must be (B, {10 * num_mix}, H, W) = "
                         f"({x.shape[0]}, {10 * num_mix}, {x.shape[2]}, {x.shape[3]}), got {tuple(params.shape)}")


def _check_params(params: torch.Tensor, num_mix: int, op: str) -> None:
    check_int(op, "num_mix", num_mix, minimum=1)
    if params.dim() != 4 or params.shape[1] != 10 * num_mix:
        raise ValueError(f"{op}: params must be (B, {10 * num_mix}, H, W) for num_mix={num_mix} "
                         f"(M logits + 3 x 3M means/log-scales/coefficients), got shape {tuple(params.shape)}")


def dml_log_prob(x: torch.Tensor, params: torch.Tensor, num_mix: int = 10, *, backend: str = "auto") -> torch.Tensor:
    """log p(x) in nats per image, (B,), for x (B, 3, H, W) on the 256-level grid of [-1, 1]."""
    _check_args(x, params, num_mix)
    return implementation("dml_log_prob", choose_backend("dml_log_prob", backend, x.device))(x, params, num_mix)


def dml_sample(params: torch.Tensor, temperature: float = 1.0, num_mix: int | None = None, *,
               backend: str = "auto") -> torch.Tensor:
    """An 8-bit image sample (B, 3, H, W) in [-1, 1]: per pixel a component drawn from the mixture, then
    a logistic draw whose noise `temperature` scales (log-scales clamped to [-8, 1] as in the likelihood).
    At temperature 0 nothing is drawn: the most probable component (largest logit) and its coupled mean."""
    check_floating("dml_sample", "params", params)
    num_mix = params.shape[1] // 10 if num_mix is None else num_mix
    _check_params(params, num_mix, "dml_sample")
    if not temperature >= 0:
        raise ValueError(f"dml_sample: temperature must be >= 0, got {temperature}")
    fn = implementation("dml_sample", choose_backend("dml_sample", backend, params.device))
    return fn(params, float(temperature), num_mix)


def split_params(params: torch.Tensor, num_mix: int):
    """(logits (B, M, H, W), means, log_scales, coeffs (B, 3, M, H, W) each), in fp32."""
    b, _, h, w = params.shape
    params = params.float()
    logits = params[:, :num_mix]
    rest = params[:, num_mix:].reshape(b, 3, 3 * num_mix, h, w)
    means = rest[:, :, :num_mix]
    log_scales = clamp_flat_at_edges(rest[:, :, num_mix:2 * num_mix], LOG_SCALE_MIN, LOG_SCALE_MAX)
    coeffs = torch.tanh(rest[:, :, 2 * num_mix:])
    return logits, means, log_scales, coeffs


def _coupled_means(means, coeffs, x):
    """mu_R = m_R, mu_G = m_G + c0 x_R, mu_B = m_B + c1 x_R + c2 x_G; x is (B, 3, 1, H, W)."""
    x_r, x_g = x[:, 0], x[:, 1]
    mu_r = means[:, 0]
    mu_g = means[:, 1] + coeffs[:, 0] * x_r
    mu_b = means[:, 2] + coeffs[:, 1] * x_r + coeffs[:, 2] * x_g
    return torch.stack([mu_r, mu_g, mu_b], dim=1)


def clamp_flat_at_edges(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(v, lo, hi) whose gradient is 0 on the edges too, the kernels' rule. Written out because
    torch.clamp's own backward at exactly lo or hi (which bf16 log-scales hit) is not the same in every
    torch release: 2.11 passes the gradient there, 2.14 does not."""
    return torch.where((v > lo) & (v < hi), v, v.detach().clamp(lo, hi))


def dml_log_prob_torch(x: torch.Tensor, params: torch.Tensor, num_mix: int) -> torch.Tensor:
    logits, means, log_scales, coeffs = split_params(params, num_mix)
    x = x.float().unsqueeze(2)  # (B, 3, 1, H, W), broadcast over components
    centered = x - _coupled_means(means, coeffs, x)
    inv_scale = torch.exp(-log_scales)
    plus_in = inv_scale * (centered + HALF_BIN)
    min_in = inv_scale * (centered - HALF_BIN)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): bin 0 takes the left tail
    log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): bin 255 takes the right tail
    # sigmoid(plus) - sigmoid(minus) from the small tail sides, as the kernels compute it, so that the
    # mass and its gradient keep their digits far in either tail: sigmoid(-minus) - sigmoid(-plus)
    # right of the mean, 1 - sigmoid(-plus) - sigmoid(minus) for a bin around it.
    right, left = min_in > 0.0, plus_in <= 0.0
    s_u = torch.sigmoid(torch.where(right, -min_in, torch.where(left, plus_in, -plus_in)))
    s_w = torch.sigmoid(torch.where(right, -plus_in, min_in))
    mass = torch.where(right | left, s_u - s_w, 1.0 - s_u - s_w)
    log_mass = torch.log(mass.clamp(min=MASS_FLOOR))
    log_probs = torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_one_minus_cdf_min, log_mass))
    log_probs = log_probs.sum(1) + torch.log_softmax(logits, dim=1)  # (B, M, H, W)
    return torch.logsumexp(log_probs, dim=1).flatten(1).sum(1)


def dml_sample_torch(params: torch.Tensor, temperature: float, num_mix: int) -> torch.Tensor:
    logits, means, log_scales, coeffs = split_params(params, num_mix)
    # One component per pixel (shared by the three channels): drawn by Gumbel-max, or at temperature 0
    # the most probable one, so that temperature 0 is deterministic.
    scores = logits
    if temperature > 0:
        uniform = torch.rand_like(logits).clamp(1e-5, 1.0 - 1e-5)
        scores = logits - torch.log(-torch.log(uniform))
    component = torch.argmax(scores, dim=1, keepdim=True)  # (B, 1, H, W)
    pick = lambda t: torch.gather(t, 2, component.unsqueeze(1).expand(-1, 3, -1, -1, -1)).squeeze(2)
    means, log_scales, coeffs = pick(means), pick(log_scales), pick(coeffs)  # (B, 3, H, W)
    u = torch.rand_like(means).clamp(1e-5, 1.0 - 1e-5)
    noisy = means + temperature * torch.exp(log_scales) * (torch.log(u) - torch.log1p(-u))
    x_r = noisy[:, 0].clamp(-1.0, 1.0)
    x_g = (noisy[:, 1] + coeffs[:, 0] * x_r).clamp(-1.0, 1.0)
    x_b = (noisy[:, 2] + coeffs[:, 1] * x_r + coeffs[:, 2] * x_g).clamp(-1.0, 1.0)
    x = torch.stack([x_r, x_g, x_b], dim=1)
    return quantize_8bit(x)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round values in [-1, 1] to the nearest of the 256 levels k / 127.5 - 1."""
    return torch.round((x + 1.0) * 127.5) / 127.5 - 1.0
