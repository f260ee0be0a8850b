"""Float64 oracles for every op, written from the equations and shared by the op tests.

Independent checks: nothing here imports dvp_fast. The DCT goes through scipy's orthonormal DCT-II on
the full D x D image; the Gaussian KL is its closed form; the mixture of logistics is the reference
form written directly, per colour; conv1x1 is an einsum. Gradients come from float64 autograd (scipy's
adjoint for the linear DCT), never from the hand-written backward kernels.
"""
import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F


def f64(t) -> np.ndarray:
    return t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


# --- DCT pseudo-inputs: y = clamp(crop_d(DCT2((x + 1) / 2)) / S, -1, 1), x = 2 clamp(IDCT2(pad(u S)), 0, 1) - 1 ---
def dct2(a):
    return scipy.fft.dctn(a, type=2, norm="ortho", axes=(-2, -1))


def idct2(a):
    return scipy.fft.idctn(a, type=2, norm="ortho", axes=(-2, -1))


def pad(block, size):
    out = np.zeros(block.shape[:-2] + (size, size))
    out[..., :block.shape[-2], :block.shape[-1]] = block
    return out


def _passes(v, lo, hi, edges_pass):
    """Where a clamp to [lo, hi] passes the gradient: on its edges too or not (both occur in the tests)."""
    return (v >= lo) & (v <= hi) if edges_pass else (v > lo) & (v < hi)


def dct_crop_oracle(x, scale):
    """(y, raw = cropped DCT / S before the clamp) for float64 arrays x (B, C, D, D) in [-1, 1], scale (C, d, d)."""
    d = scale.shape[-1]
    raw = dct2((x + 1.0) / 2.0)[..., :d, :d] / scale
    return np.clip(raw, -1.0, 1.0), raw


def dct_crop_grads_oracle(raw, scale, dy, size, edges_pass=True):
    """(dL/dx, dL/dS) for L = sum(dy * y); the adjoint of the orthonormal DCT is the inverse DCT."""
    passes = _passes(raw, -1.0, 1.0, edges_pass)
    dx = 0.5 * idct2(pad(dy * passes / scale, size))
    dscale = (-dy * passes * raw / scale).sum(0)
    return dx, dscale


def idct_pad_oracle(u, scale, size):
    """(image in [-1, 1], the pre-clamp image in [0, 1] units)."""
    image01 = idct2(pad(u * scale, size))
    return 2.0 * np.clip(image01, 0.0, 1.0) - 1.0, image01


def idct_pad_grads_oracle(u, scale, image01, dout, edges_pass=True):
    """(dL/du, dL/dS) for L = sum(dout * image): the adjoint of the zero-padded inverse DCT is the cropped DCT."""
    d = u.shape[-1]
    dv = dct2(2.0 * dout * _passes(image01, 0.0, 1.0, edges_pass))[..., :d, :d]
    return dv * scale, (dv * u).sum(0)


# --- Gaussian sample and KL ------------------------------------------------------------------------------
def gaussian_kl_oracle(mu_q, lv_q, mu_p, lv_p, eps):
    """(z, kl (B,), leaves): float64 tensors, differentiable with respect to the four leaves.

    z = mu_q + s_q eps, KL = log(s_p / s_q) + (s_q^2 + (mu_q - mu_p)^2) / (2 s_p^2) - 1/2 per element,
    summed over every non-batch dimension, with s = e^(logvar / 2).
    """
    leaves = [torch.as_tensor(f64(t)).requires_grad_() for t in (mu_q, lv_q, mu_p, lv_p)]
    m_q, l_q, m_p, l_p = leaves
    s_q, s_p = torch.exp(0.5 * l_q), torch.exp(0.5 * l_p)
    z = m_q + s_q * torch.as_tensor(f64(eps))
    kl_elem = torch.log(s_p / s_q) + (s_q ** 2 + (m_q - m_p) ** 2) / (2.0 * s_p ** 2) - 0.5
    return z, kl_elem.reshape(kl_elem.shape[0], -1).sum(1), leaves


# --- discretized mixture of logistics ------------------------------------------------------------------
HALF_BIN = 1.0 / 255.0
FLOOR = 1e-10


def dml_log_prob_oracle(x, params, num_mix):
    """The reference form on float64 tensors, differentiable: (log p (B,), interior bin masses (B, 3, M, H, W)
    with NaN at the edge levels, raw log-scales (B, 3, M, H, W)).

    Log-scales hard-clamped to [-8, 1], bin masses floored at 1e-10, log-sigmoid tails at levels 0 and 255.
    """
    m = num_mix
    b, _, h, w = params.shape
    logits = params[:, :m]
    per_colour = params[:, m:].reshape(b, 3, 3 * m, h, w)
    raw_log_scale = per_colour[:, :, m:2 * m]
    # The clamp with a zero gradient on its edges too (the kernels' rule), written out: torch.clamp's own
    # backward at exactly -8 or 1 (which bf16 inputs hit) differs between torch releases.
    inside = (raw_log_scale > -8.0) & (raw_log_scale < 1.0)
    log_scale = torch.where(inside, raw_log_scale, raw_log_scale.detach().clamp(-8.0, 1.0))
    coeff = torch.tanh(per_colour[:, :, 2 * m:])
    red, green, blue = x[:, 0:1], x[:, 1:2], x[:, 2:3]  # (B, 1, H, W): broadcast over components
    mean = [per_colour[:, 0, :m],
            per_colour[:, 1, :m] + coeff[:, 0] * red,
            per_colour[:, 2, :m] + coeff[:, 1] * red + coeff[:, 2] * green]
    total = F.log_softmax(logits, dim=1)
    masses = []
    for c, value in enumerate((red, green, blue)):
        inv_scale = torch.exp(-log_scale[:, c])
        upper = inv_scale * (value - mean[c] + HALF_BIN)
        lower = inv_scale * (value - mean[c] - HALF_BIN)
        mass = torch.sigmoid(upper) - torch.sigmoid(lower)
        first, last = value <= -1.0 + HALF_BIN, value >= 1.0 - HALF_BIN  # levels 0 and 255 on the grid
        log_p = torch.log(torch.clamp(mass, min=FLOOR))
        log_p = torch.where(first, upper - F.softplus(upper), log_p)  # log sigmoid(upper): the left tail
        log_p = torch.where(last, -F.softplus(lower), log_p)  # log(1 - sigmoid(lower)): the right tail
        masses.append(torch.where((first | last).expand_as(mass), float("nan"), mass.detach()))
        total = total + log_p
    logp = torch.logsumexp(total, dim=1).reshape(b, -1).sum(1)
    return logp, torch.stack(masses, 1), raw_log_scale.detach()


# --- 1x1 convolution -----------------------------------------------------------------------------------
def conv1x1_oracle(x, weight, bias, silu):
    """(y = W act(x) + b, the float64 leaves (x, weight[, bias])) for gradients by float64 autograd."""
    x64, w64 = (torch.from_numpy(f64(t)).requires_grad_() for t in (x, weight))
    b64 = None if bias is None else torch.from_numpy(f64(bias)).requires_grad_()
    act = x64 / (1.0 + torch.exp(-x64)) if silu else x64
    y = torch.einsum("oi,bihw->bohw", w64[:, :, 0, 0], act)
    if b64 is not None:
        y = y + b64[None, :, None, None]
    return y, [t for t in (x64, w64, b64) if t is not None]
