"""dml_log_prob and dml_sample on every backend, against the fallback and a float64 oracle of the reference form.

The likelihood is the one the paper's numbers come from, the authors' reference form: raw log-scales
hard-clamped to [-8, 1], coupling coefficients through tanh, means coupled R -> G -> B; per sub-pixel the
log of the logistic mass of its bin [x - 1/255, x + 1/255] floored at 1e-10 (no gradient below the floor),
log sigmoid tails at the first and last of the 256 levels. `oracle` below is written afresh from that
definition in float64 and shares no code with dvp_fast; its gradients come from float64 autograd, which
test_oracle_gradcheck checks against finite differences. The PixelCNN++ form used before (log-scales
clamped below at -7 only, the mid-bin density where the mass is below 1e-5) survives here only as
`pixelcnn_form`, to pin how far apart the two are.

Inputs are built backwards from x so that each (sub-pixel, component) sits either near its mean
(|x - mu| <= 4 s: mass >= 8e-5) or far from it (the nearer bin edge >= 40 s away: mass < 5e-15, below the
floor), never in between, where an fp32 mass near 1e-10 would pick the floor or not by rounding (a property
of the formula, not of a backend); the oracle counts the bins within two decades of the floor, and the tests
require none.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvp_fast import ops
from helpers import as_float64, device_for, skip_unless_implemented
from oracles import FLOOR, HALF_BIN, dml_log_prob_oracle

pytestmark = pytest.mark.usefixtures("nan_filled_allocations")

# log p (always fp32 arithmetic): error relative to |log p| of the image.
LOGP_TOL = 1e-5
# d log p / d params (carries the params' dtype): error relative to the largest gradient. For fp32 this
# is set by d/d mean ~ (sigmoid'(plus) - sigmoid'(minus)) / mass, whose terms nearly cancel near the
# mode: the fallback itself is ~5e-5 away from the float64 oracle there.
GRAD_TOL = {torch.float32: 1.5e-4, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
DTYPES = list(GRAD_TOL)
GRAD_TOL[torch.float64] = GRAD_TOL[torch.float32]  # accepted; the math is fp32 on every backend
# d log p / d x (always fp32): sums over the components and the coupled channels.
X_GRAD_TOL = {torch.float32: 3e-4, torch.bfloat16: 3e-4}
# At the smallest scales (e^-8 to e^-7.5) the fp32 rounding of a coupled mean (ulp 6e-8 to 2.4e-7) moves
# plus and minus by up to 7e-4, and d log p / d mean ~ inv_s e^-|plus| relatively by as much.
SMALL_SCALE_REGIMES = ("log_scale_-7.5", "below_-8")
SMALL_SCALE_GRAD_TOL = 1e-3
# ((B, H, W), dtype): a one-pixel image and a non-power-of-two batch in every dtype; MNIST-sized
# 28 x 28 and CIFAR-sized 32 x 32 in two dtypes each (the interpreter runs about 10 programs a second).
CASES = ([(shape, dtype) for shape in [(1, 1, 1), (2, 5, 7)] for dtype in DTYPES]
         + [((1, 28, 28), torch.float32), ((1, 28, 28), torch.bfloat16),
            ((1, 32, 32), torch.float32), ((1, 32, 32), torch.float16), ((2, 5, 7), torch.float64)])


# --- the float64 oracle ------------------------------------------------------------------------------
def oracle(x, params, num_mix):
    """(log p (B,), params leaf, x leaf, facts) of the reference form in float64.

    Differentiate log p with respect to the two leaves; `facts` says which cases the data exercised:
    counts of edge bins, interior bins above and below the 1e-10 floor and within two decades of it,
    clamped log-scales, and a mask in the layout of `params` of the means and raw log-scales whose
    bin is below the floor or whose log-scale is clamped (their gradient must be exactly 0).
    """
    m = num_mix
    p = torch.tensor(as_float64(params), requires_grad=True)
    xv = torch.tensor(as_float64(x), requires_grad=True)
    b, _, h, w = p.shape
    logp, mass, raw_log_scale = dml_log_prob_oracle(xv, p, m)
    interior = ~torch.isnan(mass)
    under = interior & (mass < FLOOR)
    clamped = (raw_log_scale < -8.0) | (raw_log_scale > 1.0)
    zero = torch.zeros(b, 3, 3 * m, h, w, dtype=torch.bool)
    zero[:, :, :m] = under
    zero[:, :, m:2 * m] = under | clamped
    facts = {
        "low_edge": int((xv < -0.999).sum()), "high_edge": int((xv > 0.999).sum()),
        "above_floor": int((interior & (mass >= FLOOR)).sum()), "below_floor": int(under.sum()),
        "near_floor": int((interior & (mass > FLOOR / 100) & (mass < FLOOR * 100)).sum()),
        "clamped_low": int((raw_log_scale < -8.0).sum()), "clamped_high": int((raw_log_scale > 1.0).sum()),
        "grad_zero_mask": torch.cat([torch.zeros(b, m, h, w, dtype=torch.bool), zero.reshape(b, 9 * m, h, w)], 1),
    }
    return logp, p, xv, facts


def pixelcnn_form(x, params, num_mix):
    """log p (B,) of the PixelCNN++ form this project used before, float64: log-scales clamped below at -7
    only, the density at the bin centre times the bin width where the bin mass is below 1e-5."""
    m = num_mix
    p, xv = torch.as_tensor(as_float64(params)), torch.as_tensor(as_float64(x))
    b, _, h, w = p.shape
    per_colour = p[:, m:].reshape(b, 3, 3 * m, h, w)
    log_scale, coeff = per_colour[:, :, m:2 * m].clamp(min=-7.0), torch.tanh(per_colour[:, :, 2 * m:])
    xs = [xv[:, c:c + 1] for c in range(3)]
    mean = [per_colour[:, 0, :m], per_colour[:, 1, :m] + coeff[:, 0] * xs[0],
            per_colour[:, 2, :m] + coeff[:, 1] * xs[0] + coeff[:, 2] * xs[1]]
    total = F.log_softmax(p[:, :m], dim=1)
    for c in range(3):
        s = torch.exp(log_scale[:, c])
        t_hi, t_lo, t = (xs[c] - mean[c] + HALF_BIN) / s, (xs[c] - mean[c] - HALF_BIN) / s, (xs[c] - mean[c]) / s
        mass = torch.sigmoid(t_hi) - torch.sigmoid(t_lo)
        mid = -t - torch.log(s) - 2.0 * F.softplus(-t) + math.log(2 * HALF_BIN)
        inner = torch.where(mass > 1e-5, torch.log(mass.clamp(min=1e-300)), mid)
        total = total + torch.where(xs[c] < -0.999, F.logsigmoid(t_hi), torch.where(xs[c] > 0.999, F.logsigmoid(-t_lo),
                                                                                     inner))
    return torch.logsumexp(total, dim=1).reshape(b, -1).sum(1)


def test_oracle_gradcheck():
    """The oracle's float64 autograd against finite differences, in every case away from the kinks:
    both edges, bins above and below the floor, log-scales inside and beyond both clamps."""
    gen = torch.Generator().manual_seed(1)
    x, raw_ls = grid_levels(2, 3, 3, "levels", gen), uniform((2, 3, 2, 3, 3), -10.0, 3.0, gen)
    x, params = build_params(x, raw_ls, near_or_far(0.6, gen), 2, torch.float64, "cpu", gen)
    _, _, _, facts = oracle(x, params, 2)
    assert facts["below_floor"] and facts["above_floor"] and facts["low_edge"] and facts["high_edge"]
    assert facts["clamped_low"] and facts["clamped_high"] and not facts["near_floor"]
    torch.autograd.gradcheck(lambda p, xv: dml_log_prob_oracle(xv, p, 2)[0],
                             (params.double().requires_grad_(), x.double().requires_grad_()))


# --- inputs -----------------------------------------------------------------------------------------
def uniform(shape, low, high, gen):
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=gen)


def grid_levels(b, h, w, which, gen):
    """x (B, 3, H, W) float64 on the 256-level grid: "levels" (any, with both edges present), "interior"
    (levels 1..254) or "edges" (only levels 0 and 255)."""
    if which == "edges":
        levels = torch.randint(0, 2, (b, 3, h, w), generator=gen) * 255
    elif which == "interior":
        levels = torch.randint(1, 255, (b, 3, h, w), generator=gen)
    else:
        levels = torch.randint(0, 256, (b, 3, h, w), generator=gen)
        levels.view(b, 3, -1)[:, 0, 0] = 0
        levels.view(b, 3, -1)[:, 2, -1] = 255
    return levels.double() / 127.5 - 1.0


# bf16 rounds a mean of magnitude up to 4 by up to 2^-7, which is 23 s at the smallest scale e^-8: far
# means keep this much more distance, so that rounding never brings a far bin near the floor.
FAR_MARGIN = 0.03


def near_or_far(near_fraction, gen):
    """offset(x, s) -> x - mu for each (sub-pixel, component): |x - mu| <= 4 s (near) with probability
    `near_fraction`, else the nearer bin edge 40 to 80 s plus FAR_MARGIN from mu on either side (mass < 5e-15)."""
    def offset(x, s):
        near = torch.rand(s.shape, generator=gen) < near_fraction
        sign = torch.where(torch.rand(s.shape, generator=gen) < 0.5, -1.0, 1.0).double()
        return torch.where(near, uniform(s.shape, -4.0, 4.0, gen) * s,
                           sign * (HALF_BIN + FAR_MARGIN + uniform(s.shape, 40.0, 80.0, gen) * s))
    return offset


def tail_offsets(gen):
    """For x at the edge levels: the mean near (30 %), 40 to 80 s inside the grid (40 %: log p about -t),
    0.5 to 3 inside the grid whatever the scale (15 %), or beyond the edge itself (15 %: log p about 0)."""
    def offset(x, s):
        kind = torch.rand(s.shape, generator=gen)
        inward = -torch.sign(x).expand_as(s)  # from the edge level into the grid
        near = uniform(s.shape, -4.0, 4.0, gen) * s
        inside_t = -inward * (HALF_BIN + FAR_MARGIN + uniform(s.shape, 40.0, 80.0, gen) * s)
        inside_abs = -inward * uniform(s.shape, 0.5, 3.0, gen)
        beyond = inward * (HALF_BIN + FAR_MARGIN + uniform(s.shape, 40.0, 80.0, gen) * s)
        return torch.where(kind < 0.3, near, torch.where(kind < 0.7, inside_t, torch.where(kind < 0.85, inside_abs,
                                                                                             beyond)))
    return offset


def build_params(x, raw_log_scale, offset, num_mix, dtype, device, gen):
    """(x float32, params of `dtype`) with raw log-scales (B, 3, M, H, W) and means mu = x - offset(x, s),
    s computed from the log-scales and coefficients as rounded to `dtype`."""
    b, _, h, w = x.shape
    m = num_mix
    raw_coef = (torch.randn(b, 3, m, h, w, dtype=torch.float64, generator=gen) * 1.5).to(dtype).double()
    raw_log_scale = raw_log_scale.to(dtype).double()
    s = torch.exp(raw_log_scale.clamp(-8.0, 1.0))
    coef = torch.tanh(raw_coef)
    xr, xg = x[:, 0:1], x[:, 1:2]
    coupling = torch.stack([torch.zeros_like(coef[:, 0]), coef[:, 0] * xr, coef[:, 1] * xr + coef[:, 2] * xg], 1)
    xe = x.unsqueeze(2).expand_as(s)
    means = xe - offset(xe, s) - coupling
    logits = torch.randn(b, m, h, w, dtype=torch.float64, generator=gen) * 2.0
    rest = torch.cat([means, raw_log_scale, raw_coef], dim=2).reshape(b, 9 * m, h, w)
    params = torch.cat([logits, rest], dim=1)
    return x.float().to(device), params.to(dtype=dtype, device=device)


def make_case(b, h, w, num_mix, dtype, device, log_scale_range=(-9.0, 1.5), seed=0):
    """The mixed case: any level, 70 % of the components near, 30 % far, log-scales uniform in the range."""
    gen = torch.Generator().manual_seed(seed)
    x = grid_levels(b, h, w, "levels", gen)
    raw_ls = uniform((b, 3, num_mix, h, w), *log_scale_range, gen)
    return build_params(x, raw_ls, near_or_far(0.7, gen), num_mix, dtype, device, gen)


def constant(value):
    return lambda shape, gen: torch.full(shape, value, dtype=torch.float64)


# The extreme regimes: name -> (levels of x, raw log-scales (shape, gen) -> tensor, offsets(gen)).
REGIMES = {
    # Nothing clamped, nothing below the floor (where the PixelCNN++ form agrees with this one).
    "moderate": ("levels", lambda sh, g: uniform(sh, -5.0, 0.5, g), lambda g: near_or_far(1.0, g)),
    # Inside the range but below PixelCNN++'s -7 clamp.
    "log_scale_-7.5": ("levels", constant(-7.5), lambda g: near_or_far(0.6, g)),
    "below_-8": ("levels", lambda sh, g: uniform(sh, -14.0, -8.25, g), lambda g: near_or_far(0.6, g)),
    "log_scale_+2": ("levels", constant(2.0), lambda g: near_or_far(0.6, g)),
    "above_+1": ("levels", lambda sh, g: uniform(sh, 1.05, 8.0, g), lambda g: near_or_far(0.6, g)),
    # Every sub-pixel at level 0 or 255, most means far away, log-scales across and beyond both clamps.
    "tails": ("edges", lambda sh, g: uniform(sh, -10.0, 3.0, g), tail_offsets),
    # Every interior bin's mass below 1e-10: log p is 3 H W log(1e-10) and no parameter moves it.
    "underflow": ("interior", lambda sh, g: uniform(sh, -7.9, 0.9, g), lambda g: near_or_far(0.0, g)),
}
# ((B, H, W), num_mix, dtype): batch 1 and odd sides, one component and ten, fp32 and bf16.
REGIME_SHAPES = [((1, 5, 7), 10, torch.float32), ((2, 3, 9), 1, torch.float32),
                 ((1, 7, 5), 10, torch.bfloat16), ((2, 9, 3), 1, torch.bfloat16)]


def regime_case(name, shape, num_mix, dtype, device, seed=0):
    levels, log_scales, offsets = REGIMES[name]
    gen = torch.Generator().manual_seed(seed)
    b, h, w = shape
    x = grid_levels(b, h, w, levels, gen)
    return build_params(x, log_scales((b, 3, num_mix, h, w), gen), offsets(gen), num_mix, dtype, device, gen)


# --- checks -----------------------------------------------------------------------------------------
def check_log_prob(actual, expected, what):
    actual64, expected = as_float64(actual), as_float64(expected)
    assert np.isfinite(actual64).all(), f"log p {what}: non-finite (a partial sum never written?)"
    err = (np.abs(actual64 - expected) / np.abs(expected)).max()
    assert err <= LOGP_TOL, f"log p {what}: relative error {err:.3g} > {LOGP_TOL}"


def check_grad(actual, expected, tol, what):
    """Max error relative to the largest expected gradient, or 10 x the absolute error where all are
    below 0.1 (below the floor the expected gradients vanish, and a logit's gets ~1e-6 of rounding:
    log p of a pixel is then -69, whose fp32 ulp is 8e-6)."""
    actual64, expected = as_float64(actual), as_float64(expected)
    assert np.isfinite(actual64).all(), f"{what}: non-finite elements (never written?)"
    err = np.abs(actual64 - expected).max() / max(np.abs(expected).max(), 0.1)
    assert err <= tol, f"{what}: error {err:.3g} relative to the max > {tol}"


def check_against_oracle(backend, x, params, num_mix, seed=0, small_scales=False):
    """Forward and backward (params, and x where the backend differentiates it) of `backend` against the
    oracle and against the fallback; gradients that must vanish must be exactly 0. Returns the facts."""
    dtype = params.dtype
    grad_tol, x_grad_tol = GRAD_TOL[dtype], X_GRAD_TOL.get(dtype, X_GRAD_TOL[torch.float32])
    if small_scales:
        grad_tol, x_grad_tol = max(grad_tol, SMALL_SCALE_GRAD_TOL), max(x_grad_tol, SMALL_SCALE_GRAD_TOL)
    with_x = backend != "triton"  # the Triton op treats x as data
    p = params.detach().clone().requires_grad_()
    xv = x.detach().clone().requires_grad_(with_x)
    logp = ops.dml_log_prob(xv, p, num_mix, backend=backend)
    assert logp.shape == x.shape[:1] and logp.dtype == torch.float32
    dlogp = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed)).to(logp.device)
    grads = torch.autograd.grad(logp, [p, xv] if with_x else [p], dlogp)
    assert grads[0].dtype == dtype

    logp_ref, p_ref, x_ref, facts = oracle(x, params, num_mix)
    grads_ref = torch.autograd.grad(logp_ref, [p_ref, x_ref], torch.as_tensor(as_float64(dlogp)))
    assert facts["near_floor"] == 0, "no bin may have a mass within two decades of the floor"
    check_log_prob(logp, logp_ref, "vs float64 oracle")
    check_grad(grads[0], grads_ref[0], grad_tol, "d params vs float64 oracle")
    zero = facts["grad_zero_mask"].to(grads[0].device)
    assert (grads[0][zero] == 0).all(), (
        f"{int((grads[0][zero] != 0).sum())} of {int(zero.sum())} gradients of means and raw log-scales "
        "below the floor or beyond the clamps are not exactly 0")
    if with_x:
        assert grads[1].dtype == torch.float32
        check_grad(grads[1], grads_ref[1], x_grad_tol, "d x vs float64 oracle")

    if backend != "torch":
        p_fb, x_fb = params.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        logp_fb = ops.dml_log_prob(x_fb, p_fb, num_mix, backend="torch")
        grads_fb = torch.autograd.grad(logp_fb, [p_fb, x_fb], dlogp)
        check_log_prob(logp, logp_fb, "vs fallback")
        check_grad(grads[0], grads_fb[0], grad_tol, "d params vs fallback")
        if with_x:
            check_grad(grads[1], grads_fb[1], x_grad_tol, "d x vs fallback")
    return logp, grads, facts


# --- log-likelihood ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, num_mix, dtype", REGIME_SHAPES,
                         ids=lambda c: str(c).replace("torch.", "") if isinstance(c, torch.dtype) else
                         ("B{}H{}W{}".format(*c) if isinstance(c, tuple) else f"M{c}"))
@pytest.mark.parametrize("regime", list(REGIMES))
def test_regime_forward_backward(backend, regime, shape, num_mix, dtype):
    dev = device_for(backend)
    x, params = regime_case(regime, shape, num_mix, dtype, dev)
    logp, grads, facts = check_against_oracle(backend, x, params, num_mix, small_scales=regime in SMALL_SCALE_REGIMES)
    b, h, w = shape
    m = num_mix
    grad_p = grads[0].detach().double().cpu().reshape(b, 10 * m, h, w)
    raw_ls = params.detach().double().cpu()[:, m:].reshape(b, 3, 3 * m, h, w)[:, :, m:2 * m]
    g_ls = grad_p[:, m:].reshape(b, 3, 3 * m, h, w)[:, :, m:2 * m]
    if regime == "moderate":
        assert facts["below_floor"] == facts["clamped_low"] == facts["clamped_high"] == 0 and facts["above_floor"]
    if regime == "log_scale_-7.5":
        assert facts["below_floor"] and facts["above_floor"] and not (facts["clamped_low"] or facts["clamped_high"])
    if regime in ("below_-8", "log_scale_+2", "above_+1"):
        # The clamp is hard: the raw log-scale gets no gradient at all.
        assert facts["clamped_low" if regime == "below_-8" else "clamped_high"] == raw_ls.numel()
        assert (g_ls == 0).all(), "d / d raw log-scale must be exactly 0 beyond the clamp"
    if regime == "tails":
        assert facts["low_edge"] + facts["high_edge"] == 3 * b * h * w and facts["above_floor"] == 0
        assert facts["clamped_low"] and facts["clamped_high"]
        assert g_ls.abs().max() > 0, "edge bins inside the clamps do move the log-scale"
    if regime == "underflow":
        assert facts["below_floor"] == 3 * m * b * h * w and facts["above_floor"] == 0
        torch.testing.assert_close(logp.double().cpu(), torch.full((b,), 3 * h * w * math.log(FLOOR),
                                                                   dtype=torch.float64), rtol=1e-6, atol=0)
        assert (grad_p[:, m:] == 0).all(), "below the floor no mean, log-scale or coefficient gets a gradient"
        assert grad_p[:, :m].abs().max() < 1e-5, "all components are equally likely: no logit gradient"
        if len(grads) > 1:
            assert (grads[1] == 0).all(), "below the floor x gets no gradient"


@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda c: str(c) if isinstance(c, torch.dtype) else
                         "B{}H{}W{}".format(*c))
def test_log_prob_forward_backward(backend, shape, dtype):
    """Everything mixed in one image: any level, near and far means, log-scales from -9 to 1.5."""
    dev = device_for(backend)
    num_mix = 10
    # Low-precision params round the means; their scales are kept >= e^-3 so that moves t by < 0.2.
    x, params = make_case(*shape, num_mix, dtype, dev,
                          log_scale_range=(-9.0, 1.5) if dtype == torch.float32 else (-3.0, 1.5))
    _, _, facts = check_against_oracle(backend, x, params, num_mix)
    assert facts["low_edge"] and facts["high_edge"] and facts["above_floor"]
    if shape[1] * shape[2] > 1:
        assert facts["below_floor"], "the data must reach the 1e-10 floor"
        assert facts["clamped_high"], "the data must reach the +1 log-scale clamp"
        assert dtype != torch.float32 or facts["clamped_low"], "the data must reach the -8 log-scale clamp"


@pytest.mark.parametrize("config", ["32x4", "64x8"])
def test_every_triton_launch_configuration_is_the_same_function(config):
    """The launch configurations a GPU measurement chooses between (kernels/dml.py CONFIGS) compute
    the oracle's values, on an image that is not a multiple of any block (9 x 13 pixels)."""
    from dvp_fast.kernels import dml as dml_kernels

    if not ops.backend_available("triton"):
        pytest.skip("the triton backend is not available here")
    x, params = make_case(2, 9, 13, 10, torch.float32, device_for("triton"))
    with dml_kernels.use_config(config):
        assert dml_kernels.launch_config() == dml_kernels.CONFIGS[config]
        check_against_oracle("triton", x, params, 10)


@pytest.mark.parametrize("num_mix", [1, 3])
def test_other_mixture_sizes(backend, num_mix):
    """M = 1 and a non-power-of-two M (padded components must carry no weight)."""
    x, params = make_case(2, 6, 5, num_mix, torch.float32, device_for(backend))
    check_against_oracle(backend, x, params, num_mix)


# Where the reference form and PixelCNN++'s differ, on one CIFAR-sized image with 10 components, x at
# random levels, logits, means and coefficients N(0, 1): (regime, (low, high) of PixelCNN++ - reference
# log p in nats per image; measured -1.29e6, -2.9e3, +3.4e3 and 0). At -7.5 PixelCNN++ clamps the scales
# to e^-7 and prices far bins by a density far below 1e-10; at +2 the reference clamps them to e; on the
# edge levels ("tails": means 0.5 to 2 inside the grid, log-scales from -10 to 3) only the clamps differ;
# in a moderate range the two are the same function (no bin below 1e-5 there).
FORM_GAPS = {"log_scale_-7.5": (-2e6, -5e5), "log_scale_+2": (-4000, -2000), "tails": (500, 2e4),
             "moderate": (-1e-6, 1e-6)}


@pytest.mark.parametrize("regime", list(FORM_GAPS))
def test_differs_from_the_pixelcnn_form_where_it_should(backend, regime):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(5)
    b, m, h, w = 1, 10, 32, 32
    x = grid_levels(b, h, w, "edges" if regime == "tails" else "levels", gen)
    params = torch.randn(b, 10 * m, h, w, dtype=torch.float64, generator=gen)
    per_colour = params[:, m:].view(b, 3, 3 * m, h, w)
    if regime == "moderate":  # near means, so that no bin is below 1e-5
        x, params = build_params(x, uniform((b, 3, m, h, w), -5.0, 0.5, gen), near_or_far(1.0, gen), m,
                                 torch.float32, dev, gen)
    else:
        if regime == "tails":
            per_colour[:, :, m:2 * m].uniform_(-10.0, 3.0, generator=gen)
            per_colour[:, :, :m] = -x.unsqueeze(2) * uniform((b, 3, m, h, w), 0.5, 2.0, gen)
        else:
            per_colour[:, :, m:2 * m] = -7.5 if regime == "log_scale_-7.5" else 2.0
        x, params = x.float().to(dev), params.float().to(dev)
    with torch.no_grad():
        logp = ops.dml_log_prob(x, params, m, backend=backend)
    logp_ref, *_ = oracle(x, params, m)
    check_log_prob(logp, logp_ref, "vs float64 oracle")
    gap = (pixelcnn_form(x, params, m) - logp_ref).item()
    low, high = FORM_GAPS[regime]
    assert low <= gap <= high, f"PixelCNN++ - reference = {gap:.6g} nats, expected in [{low}, {high}]"


def test_no_grad_forward_matches(backend):
    """Without autograd the fused gradient is skipped; log p must not change."""
    dev = device_for(backend)
    x, params = make_case(2, 7, 9, 10, torch.float32, dev)
    with torch.no_grad():
        logp_plain = ops.dml_log_prob(x, params, 10, backend=backend)
    logp_grad = ops.dml_log_prob(x, params.clone().requires_grad_(), 10, backend=backend)
    torch.testing.assert_close(logp_plain, logp_grad.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("log_scales", [(-1.0, 0.0), (-12.0, -8.5), (1.5, 4.0)], ids=["moderate", "below", "above"])
def test_probabilities_over_all_levels_sum_to_one(backend, log_scales):
    """256 one-pixel images, R at every level; G and B sit at an edge bin whose mean lies 500
    beyond it, so their probability is 1 and the 256 values of p(x) are p(R = level). With the
    log-scales clamped to -8 most levels sit at the floor, which adds at most 256e-10."""
    dev = device_for(backend)
    m = 10
    levels = torch.arange(256, dtype=torch.float64)
    x = torch.stack([levels / 127.5 - 1.0, torch.full_like(levels, -1.0), torch.full_like(levels, 1.0)], 1)
    x = x.reshape(256, 3, 1, 1)
    logits = torch.randn(m, dtype=torch.float64)
    means = torch.stack([torch.empty(m, dtype=torch.float64).uniform_(-0.5, 0.5),
                         torch.full((m,), -500.0, dtype=torch.float64), torch.full((m,), 500.0, dtype=torch.float64)])
    log_scales = torch.empty(3, m, dtype=torch.float64).uniform_(*log_scales)
    coefs = torch.randn(3, m, dtype=torch.float64)
    rest = torch.cat([means, log_scales, coefs], dim=1).reshape(9 * m)
    params = torch.cat([logits, rest]).reshape(1, 10 * m, 1, 1).expand(256, -1, -1, -1).contiguous()
    total_ref = torch.exp(dml_log_prob_oracle(x, params, m)[0]).sum().item()  # exact levels, float64
    assert abs(total_ref - 1.0) < 3e-8, total_ref
    logp = ops.dml_log_prob(x.float().to(dev), params.float().to(dev), m, backend=backend)
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


def test_sample_at_zero_temperature_takes_the_most_probable_component(backend):
    """Temperature 0 is the mode of the component choice: per pixel the component with the largest logit
    (no Gumbel noise) and its mean, the same on every call. Hand-built: three components whose weights
    differ by little (0.36 / 0.34 / 0.30, rotated so each pixel has another winner), means on the level
    grid and no coupling, so the answer is the winner's mean exactly. A Gumbel draw would pick a loser
    for about two pixels in three."""
    skip_unless_implemented(backend, "dml_sample")
    dev = device_for(backend)
    b, h, w, m = 2, 4, 5, 3
    winner = torch.arange(b * h * w).reshape(b, h, w) % m  # pixel p's most probable component
    weights = torch.tensor([0.36, 0.34, 0.30])
    levels = torch.tensor([[40, 128, 230], [10, 90, 200], [250, 60, 5]], dtype=torch.float64)  # (channel, k)
    params = torch.zeros(b, 10 * m, h, w)
    for k in range(m):
        params[:, k] = torch.log(weights[(k - winner) % m])  # component `winner` gets 0.36
        for ch in range(3):
            params[:, m + 3 * m * ch + k] = float(levels[ch, k] / 127.5 - 1.0)
            params[:, m + 3 * m * ch + m + k] = math.log(0.05)
    expected = levels[:, winner].permute(1, 0, 2, 3)  # (B, 3, H, W) level indices
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        got = level_index(ops.dml_sample(params.to(dev), 0.0, m, backend=backend)).cpu()
        assert torch.equal(got, expected), f"seed {seed}: {(got != expected).double().mean():.0%} of sub-pixels differ"


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


@pytest.mark.parametrize("raw_log_scale", [-12.0, -7.5, 2.0, 4.0])
def test_sample_clamps_log_scales_to_the_range(backend, raw_log_scale):
    """One component with the log-scale clamp(raw, -8, 1): the sample CDF follows that logistic. The mean
    sits 1e-3 below the upper edge of level 100's bin, so P(level <= 100) = sigmoid(1e-3 / s) tells e^-8
    from e^-7.5 and e^-7; the spread over the levels tells e from e^2 and e^4."""
    skip_unless_implemented(backend, "dml_sample")
    dev = device_for(backend)
    s = math.exp(min(max(raw_log_scale, -8.0), 1.0))
    mean = (100 / 127.5 - 1.0) + HALF_BIN - 1e-3
    params = sample_params(2, 32, 32, 1, torch.full((3, 1), mean), raw_log_scale)
    sample = ops.dml_sample(params.to(dev), 1.0, 1, backend=backend).cpu().double().ravel()
    n = sample.numel()
    for k in (10, 60, 99, 100, 101, 160, 240):
        level = k / 127.5 - 1.0
        expected = 0.5 + 0.5 * math.tanh((level + HALF_BIN - mean) / (2 * s))  # P(rounded sample <= level)
        observed = (sample <= level + 1e-6).double().mean().item()
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3, (k, observed, expected)
