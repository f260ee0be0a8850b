"""dml_log_prob and dml_sample on every backend, against the fallback and a float64 PixelCNN++ oracle.

The oracle below is written directly from the PixelCNN++ definition in float64
(CDF differences, log-sigmoid tails, the density at the bin centre times the bin
width 2/255 where the mass is below 1e-5); its gradients come from float64 autograd.

Inputs are built backwards from x so that each (sub-pixel, component) sits either
near its mean (|x - mu| <= 4 s: mass >= 1.4e-4) or far from it (>= 30 s: mass < 1e-11),
never in between, where fp32 CDF differences lose most digits and the 1e-5 floor
would decide branches by rounding (that band is a property of the formula, not of a backend).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvp_fast import ops
from helpers import as_float64, device_for, skip_unless_implemented

pytestmark = pytest.mark.usefixtures("nan_filled_allocations")

# log p (always fp32 arithmetic): error relative to |log p| of the image.
LOGP_TOL = 1e-5
# d log p / d params (carries the params' dtype): error relative to the largest gradient. For fp32 this
# is set by d/d mean ~ (sigmoid'(plus) - sigmoid'(minus)) / mass, whose terms nearly cancel near the
# mode: the fallback itself is ~5e-5 away from the float64 oracle there.
GRAD_TOL = {torch.float32: 1.5e-4, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
DTYPES = list(GRAD_TOL)
GRAD_TOL[torch.float64] = GRAD_TOL[torch.float32]  # accepted; the math is fp32 on every backend
# ((B, H, W), dtype): a one-pixel image and a non-power-of-two batch in every dtype; MNIST-sized
# 28 x 28 and CIFAR-sized 32 x 32 in two dtypes each (the interpreter runs about 10 programs a second).
CASES = ([(shape, dtype) for shape in [(1, 1, 1), (2, 5, 7)] for dtype in DTYPES]
         + [((1, 28, 28), torch.float32), ((1, 28, 28), torch.bfloat16),
            ((1, 32, 32), torch.float32), ((1, 32, 32), torch.float16), ((2, 5, 7), torch.float64)])
HALF_BIN = 1.0 / 255.0
















# --- the float64 oracle ------------------------------------------------------------------------------
def oracle(x, params, num_mix):
    """(log p (B,), d log p / d params for L = sum(log p * dlogp) if asked later, per-sub-pixel facts).

    Returns (logp, leaf, facts) with `leaf` the float64 params to differentiate and facts a dict
    of boolean masks saying which branches the data exercised.
    """
    m = num_mix
    leaf = torch.as_tensor(as_float64(params)).requires_grad_()
    x = torch.as_tensor(as_float64(x))
    b, _, h, w = leaf.shape
    rest = leaf[:, m:].reshape(b, 3, 3 * m, h, w)
    raw_log_scale = rest[:, :, m:2 * m]
    log_scale = torch.clamp(raw_log_scale, min=-7.0)
    coef = torch.tanh(rest[:, :, 2 * m:])
    xs = [x[:, c:c + 1] for c in range(3)]  # (B, 1, H, W), broadcast over components
    mus = [rest[:, 0, :m],
           rest[:, 1, :m] + coef[:, 0] * xs[0],
           rest[:, 2, :m] + coef[:, 1] * xs[0] + coef[:, 2] * xs[1]]
    log_joint = torch.log_softmax(leaf[:, :m], dim=1)
    masses = []
    for c in range(3):
        s = torch.exp(log_scale[:, c])
        t_hi, t_lo, t = (xs[c] + HALF_BIN - mus[c]) / s, (xs[c] - HALF_BIN - mus[c]) / s, (xs[c] - mus[c]) / s
        mass = torch.sigmoid(t_hi) - torch.sigmoid(t_lo)
        log_density = -t - torch.log(s) - 2.0 * F.softplus(-t)  # logistic pdf at the bin centre
        interior = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-300)), log_density + math.log(2 * HALF_BIN))
        log_p = torch.where(xs[c] < -0.999, F.logsigmoid(t_hi), torch.where(xs[c] > 0.999, F.logsigmoid(-t_lo),
                                                                                  interior))
        masses.append(torch.where((xs[c] < -0.999) | (xs[c] > 0.999), float("nan"), mass).detach())
        log_joint = log_joint + log_p
    logp = torch.logsumexp(log_joint, dim=1).reshape(b, -1).sum(1)
    mass = torch.stack(masses, 1)
    facts = {"floor": (mass < 1e-5).any().item(), "mass": (mass >= 1e-5).any().item(),
             "low_edge": (x < -0.999).any().item(), "high_edge": (x > 0.999).any().item(),
             "clamped": (raw_log_scale < -7.0).any().item(), "min_interior_mass": mass}
    return logp, leaf, facts


# --- inputs -----------------------------------------------------------------------------------------
def make_case(b, h, w, num_mix, dtype, device, min_log_scale=-8.0):
    """(x, params): x on the 256-level grid with both extreme levels; params with every
    (sub-pixel, component) at |x - mu| / s in [0, 4] (near) or [30, 60] (far)."""
    m = num_mix
    levels = torch.randint(0, 256, (b, 3, h, w))
    levels.view(b, 3, -1)[:, 0, 0] = 0
    levels.view(b, 3, -1)[:, 2, -1] = 255
    x = levels.double() / 127.5 - 1.0
    raw_log_scale = torch.empty(b, 3, m, h, w, dtype=torch.float64).uniform_(min_log_scale, 0.0)
    raw_coef = torch.randn(b, 3, m, h, w, dtype=torch.float64) * 1.5
    near = torch.rand(b, 3, m, h, w) < 0.7
    sign = torch.where(torch.rand(b, 3, m, h, w) < 0.5, -1.0, 1.0).double()
    t = torch.where(near, torch.empty_like(sign).uniform_(-4.0, 4.0), sign * torch.empty_like(sign).uniform_(30, 60))
    # Low-precision params round the means; their scales are kept >= e^-3 so that moves t by < 0.2.
    raw_coef = raw_coef.to(dtype).double()
    raw_log_scale = raw_log_scale.to(dtype).double()
    s = torch.exp(raw_log_scale.clamp(min=-7.0))
    coef = torch.tanh(raw_coef)
    xr, xg = x[:, 0:1], x[:, 1:2]
    coupling = torch.stack([torch.zeros_like(coef[:, 0]), coef[:, 0] * xr, coef[:, 1] * xr + coef[:, 2] * xg], 1)
    means = x.unsqueeze(2) - t * s - coupling
    logits = torch.randn(b, m, h, w, dtype=torch.float64) * 2.0
    rest = torch.cat([means, raw_log_scale, raw_coef], dim=2).reshape(b, 9 * m, h, w)
    params = torch.cat([logits, rest], dim=1)
    return x.float().to(device), params.to(dtype=dtype, device=device)


# --- log-likelihood ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda c: str(c) if isinstance(c, torch.dtype) else
                         "B{}H{}W{}".format(*c))
def test_log_prob_forward_backward(backend, shape, dtype):
    dev = device_for(backend)
    num_mix = 10
    x, params = make_case(*shape, num_mix, dtype, dev, min_log_scale=-8.0 if dtype == torch.float32 else -3.0)
    params.requires_grad_()
    logp = ops.dml_log_prob(x, params, num_mix, backend=backend)
    dlogp = torch.randn_like(logp)
    (dparams,) = torch.autograd.grad(logp, params, dlogp)
    assert logp.shape == shape[:1] and logp.dtype == torch.float32 and dparams.dtype == dtype

    logp_ref, leaf, facts = oracle(x, params, num_mix)
    (dparams_ref,) = torch.autograd.grad(logp_ref, leaf, torch.as_tensor(as_float64(dlogp)))
    assert facts["low_edge"] and facts["high_edge"] and facts["mass"]
    if shape[1] * shape[2] > 1:
        assert facts["floor"], "the data must reach the mid-bin density fallback"
        assert dtype != torch.float32 or facts["clamped"], "the data must reach the -7 log-scale clamp"
    check_log_prob(logp, logp_ref, "vs float64 oracle")
    check_grad(dparams, dparams_ref, dtype, "vs float64 oracle")

    params_fb = params.detach().clone().requires_grad_()
    logp_fb = ops.dml_log_prob(x, params_fb, num_mix, backend="torch")
    (dparams_fb,) = torch.autograd.grad(logp_fb, params_fb, dlogp)
    check_log_prob(logp, logp_fb, "vs fallback")
    check_grad(dparams, dparams_fb, dtype, "vs fallback")


def check_log_prob(actual, expected, what):
    actual64, expected = as_float64(actual), as_float64(expected)
    assert np.isfinite(actual64).all(), f"log p {what}: non-finite (a partial sum never written?)"
    err = (np.abs(actual64 - expected) / np.abs(expected)).max()
    assert err <= LOGP_TOL, f"log p {what}: relative error {err:.3g} > {LOGP_TOL}"


def check_grad(actual, expected, dtype, what):
    actual64, expected = as_float64(actual), as_float64(expected)
    assert np.isfinite(actual64).all(), f"d params {what}: non-finite elements (never written?)"
    err = np.abs(actual64 - expected).max() / np.abs(expected).max()
    assert err <= GRAD_TOL[dtype], f"d params {what}: error {err:.3g} relative to the max > {GRAD_TOL[dtype]}"


@pytest.mark.parametrize("num_mix", [1, 3])
def test_other_mixture_sizes(backend, num_mix):
    """M = 1 and a non-power-of-two M (padded components must carry no weight)."""
    dev = device_for(backend)
    x, params = make_case(2, 6, 5, num_mix, torch.float32, dev)
    params.requires_grad_()
    logp = ops.dml_log_prob(x, params, num_mix, backend=backend)
    dlogp = torch.randn_like(logp)
    (dparams,) = torch.autograd.grad(logp, params, dlogp)
    logp_ref, leaf, _ = oracle(x, params, num_mix)
    (dparams_ref,) = torch.autograd.grad(logp_ref, leaf, torch.as_tensor(as_float64(dlogp)))
    check_log_prob(logp, logp_ref, "vs float64 oracle")
    check_grad(dparams, dparams_ref, torch.float32, "vs float64 oracle")


def test_no_grad_forward_matches(backend):
    """Without autograd the fused gradient is skipped; log p must not change."""
    dev = device_for(backend)
    x, params = make_case(2, 7, 9, 10, torch.float32, dev)
    with torch.no_grad():
        logp_plain = ops.dml_log_prob(x, params, 10, backend=backend)
    logp_grad = ops.dml_log_prob(x, params.clone().requires_grad_(), 10, backend=backend)
    torch.testing.assert_close(logp_plain, logp_grad.detach(), rtol=1e-6, atol=0)


def test_probabilities_over_all_levels_sum_to_one(backend):
    """256 one-pixel images, R at every level; G and B sit at an edge bin whose mean lies 50
    beyond it, so their probability is 1 and the 256 values of p(x) are p(R = level)."""
    dev = device_for(backend)
    m = 10
    levels = torch.arange(256, dtype=torch.float64)
    x = torch.stack([levels / 127.5 - 1.0, torch.full_like(levels, -1.0), torch.full_like(levels, 1.0)], 1)
    x = x.reshape(256, 3, 1, 1)
    logits = torch.randn(m, dtype=torch.float64)
    means = torch.stack([torch.empty(m, dtype=torch.float64).uniform_(-0.5, 0.5),
                         torch.full((m,), -50.0, dtype=torch.float64), torch.full((m,), 50.0, dtype=torch.float64)])
    log_scales = torch.empty(3, m, dtype=torch.float64).uniform_(-1.0, 0.0)
    coefs = torch.randn(3, m, dtype=torch.float64)
    rest = torch.cat([means, log_scales, coefs], dim=1).reshape(9 * m)
    params = torch.cat([logits, rest]).reshape(1, 10 * m, 1, 1).expand(256, -1, -1, -1).contiguous()
    x, params = x.float().to(dev), params.float().to(dev)
    _, _, facts = oracle(x, params, m)
    assert not facts["floor"], "no interior bin may fall back to the density"
    logp = ops.dml_log_prob(x, params, m, backend=backend)
    total = torch.exp(logp.double()).sum().item()
    assert abs(total - 1.0) < 1e-4, total


# --- sampling ----------------------------------------------------------------------------------------
def sample_params(b, h, w, m, means, log_scale, logits=None, coefs=None):
    """Params with per-component means (3, M), one log-scale, optional logits (M,) and coefficients (3, M)."""
    logits = torch.zeros(m) if logits is None else logits
    coefs = torch.zeros(3, m) if coefs is None else coefs
    rest = torch.cat([means, torch.full((3, m), float(log_scale)), coefs], dim=1).reshape(9 * m)
    return torch.cat([logits, rest]).reshape(1, 10 * m, 1, 1).expand(b, -1, h, w).contiguous()


def level_index(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x.double() + 1.0) * 127.5)


def test_sample_is_on_the_grid_and_reproducible(backend):
    skip_unless_implemented(backend, "dml_sample")
    dev = device_for(backend)
    _, params = make_case(2, 9, 7, 10, torch.float32, dev)
    torch.manual_seed(3)
    a = ops.dml_sample(params, 1.0, 10, backend=backend)
    torch.manual_seed(3)
    b = ops.dml_sample(params, 1.0, 10, backend=backend)
    c = ops.dml_sample(params, 1.0, 10, backend=backend)
    assert a.shape == (2, 3, 9, 7) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert a.min() >= -1.0 and a.max() <= 1.0
    idx = (a.double() + 1.0) * 127.5
    assert (idx - idx.round()).abs().max() < 1e-4, "samples must lie on the 256-level grid"


def test_sample_at_zero_temperature_is_the_coupled_mean(backend):
    """One dominant component, no noise: x_R = m_R, x_G = m_G + c0 x_R, x_B = m_B + c1 x_R + c2 x_G (clamped)."""
    skip_unless_implemented(backend, "dml_sample")
    dev = device_for(backend)
    b, h, w, m = 2, 6, 5, 4
    x, params = make_case(b, h, w, m, torch.float32, dev)
    params[:, :m] = -30.0
    params[:, 2] = 30.0  # component 2 wins every pixel's Gumbel-max
    sample = ops.dml_sample(params, 0.0, m, backend=backend)
    rest = as_float64(params)[:, m:].reshape(b, 3, 3 * m, h, w)
    mean, coef = rest[:, :, 2], np.tanh(rest[:, :, 2 * m + 2])
    x_r = np.clip(mean[:, 0], -1, 1)
    x_g = np.clip(mean[:, 1] + coef[:, 0] * x_r, -1, 1)
    x_b = np.clip(mean[:, 2] + coef[:, 1] * x_r + coef[:, 2] * x_g, -1, 1)
    expected = np.round((np.stack([x_r, x_g, x_b], 1) + 1.0) * 127.5)
    assert np.array_equal(level_index(sample).cpu().numpy(), expected)


def test_sample_component_frequencies(backend):
    """Two components, weights 0.3 / 0.7, means -0.5 / +0.5, tiny scales: the shared choice shows in R, G and B."""
    skip_unless_implemented(backend, "dml_sample")
    dev = device_for(backend)
    means = torch.tensor([[-0.5, 0.5]] * 3)
    params = sample_params(2, 32, 32, 2, means, -7.0, logits=torch.tensor([math.log(0.3), math.log(0.7)]))
    sample = ops.dml_sample(params.to(dev), 1.0, 2, backend=backend).cpu()
    high = sample > 0
    assert torch.equal(high[:, 0], high[:, 1]) and torch.equal(high[:, 0], high[:, 2]), "one component per pixel"
    n = high[:, 0].numel()
    frac = high[:, 0].double().mean().item()
    assert abs(frac - 0.7) < 4 * math.sqrt(0.21 / n), frac


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_logistic_distribution(backend, temperature):
    """One component, mean 0, scale 0.1: the sample CDF at a few levels matches the quantised logistic."""
    skip_unless_implemented(backend, "dml_sample")
    dev = device_for(backend)
    params = sample_params(2, 32, 32, 1, torch.zeros(3, 1), math.log(0.1))
    sample = ops.dml_sample(params.to(dev), temperature, 1, backend=backend).cpu().double().ravel()
    n = sample.numel()
    s = 0.1 * temperature
    for v in (-0.3, -0.1, 0.0, 0.05, 0.2):
        level = round((v + 1.0) * 127.5) / 127.5 - 1.0
        expected = 1.0 / (1.0 + math.exp(-(level + HALF_BIN) / s))  # P(rounded sample <= level)
        observed = (sample <= level + 1e-6).double().mean().item()
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3, (v, observed, expected)
