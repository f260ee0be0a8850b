"""Property tests (hypothesis): every op on every backend agrees with the fallback and stays finite.

Inputs mix ordinary values with the extremes a long training run can reach: log-variances
of +-30, pixels exactly 0 and 255 (x = -1 and 1), mixture logits of +-1e4, means far outside
[-1, 1], constant images, huge and tiny pseudo-inputs. Wherever the math is finite the
output and the gradients must be finite (no NaN from an overflowing intermediate), and the
fused backends must agree with the pure-PyTorch fallback.

Examples are few and derandomised (each runs under the Triton interpreter without a GPU)
so the file takes well under a minute and a failure reproduces; hypothesis shrinks it.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvp_fast import ops
from dvp_fast.ops import _backend
from dvp_fast.ops.dct import dct_scale_bound
from helpers import device_for

BACKENDS = [b for b in ("torch", "triton", "cpp") if ops.backend_available(b)]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Error allowed relative to the largest expected magnitude, per input dtype (as in the op tests).
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}





def filled(seed: int, shape, base_scale: float, specials, fraction: float) -> torch.Tensor:
    """Gaussian values times base_scale, with `fraction` of the elements replaced by `specials`."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * base_scale
    if specials and fraction > 0:
        pick = torch.tensor(specials, dtype=torch.float64)[torch.randint(len(specials), shape, generator=g)]
        t = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < fraction, pick, t)
    return t


seeds = st.integers(0, 2**31 - 1)
fractions = st.sampled_from([0.0, 0.3, 1.0])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, floor: float = 1e-30):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a[~torch.isfinite(a)][:5].tolist()}"
    err = (a - e).abs().max().item() / max(e.abs().max().item(), floor)
    assert err <= tol, f"{what}: max error {err:.3g} relative to max |expected|, tolerance {tol:.3g}"


# --- dct_crop and idct_pad ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, batch=st.integers(1, 3), channels=st.sampled_from([1, 3]), size=st.integers(8, 32),
       d=st.integers(1, 8), dtype=st.sampled_from(DTYPES), fraction=fractions,
       constant=st.booleans())
def test_dct_crop_matches_the_fallback_at_the_ends_of_the_pixel_range(backend, seed, batch, channels, size, d,
                                                                     dtype, fraction, constant):
    dev = device_for(backend)
    shape = (batch, channels, size, size)
    x = filled(seed, shape, 0.5, [-1.0, 1.0, 0.0], fraction).clamp(-1, 1)
    if constant:  # a blank or saturated image: every AC coefficient is zero
        x = torch.full(shape, float(np.sign(seed % 3 - 1)), dtype=torch.float64)
    x = x.to(dtype=dtype, device=dev)
    scale = dct_scale_bound(channels, d, size).to(dev)
    y = ops.dct_crop(x, scale, backend=backend)
    ref = ops.dct_crop(x, scale, backend="torch")
    assert y.shape == (batch, channels, d, d) and y.dtype == dtype
    assert_close(y, ref, TOL[dtype], f"dct_crop[{backend}]", floor=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, batch=st.integers(1, 3), channels=st.sampled_from([1, 3]), size=st.integers(8, 32),
       d=st.integers(1, 8), dtype=st.sampled_from(DTYPES), scale_factor=st.sampled_from([1e-6, 1.0, 1e6]))
def test_dct_crop_stays_in_range_for_tiny_and_huge_normalisers(backend, seed, batch, channels, size, d, dtype,
                                                               scale_factor):
    dev = device_for(backend)
    x = filled(seed, (batch, channels, size, size), 1.0, [-1.0, 1.0], 0.5).clamp(-1, 1).to(dtype=dtype, device=dev)
    y = ops.dct_crop(x, (dct_scale_bound(channels, d, size) * scale_factor).to(dev), backend=backend)
    assert torch.isfinite(y).all() and y.abs().max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, batch=st.integers(1, 3), channels=st.sampled_from([1, 3]), d=st.integers(1, 8),
       extra=st.integers(0, 24), dtype=st.sampled_from(DTYPES), fraction=fractions,
       magnitude=st.sampled_from([1.0, 1e4]))
def test_idct_pad_matches_the_fallback_for_huge_pseudo_inputs(backend, seed, batch, channels, d, extra, dtype,
                                                              fraction, magnitude):
    dev = device_for(backend)
    size = d + extra
    u = filled(seed, (batch, channels, d, d), 1.0, [-magnitude, magnitude, 0.0], fraction)
    u = u.to(dtype=dtype, device=dev).requires_grad_()
    scale = dct_scale_bound(channels, d, size).to(dev)
    image = ops.idct_pad(u, scale, size, backend=backend)
    ref = ops.idct_pad(u.detach(), scale, size, backend="torch")
    # The output is a clamp of values up to |u| S; an error that size may move a clamped pixel.
    pre_clamp = max(1.0, u.detach().abs().max().item() * scale.abs().max().item())
    assert_close(image, ref, TOL[dtype] * pre_clamp, f"idct_pad[{backend}]", floor=1.0)
    (grad,) = torch.autograd.grad(image, u, torch.randn_like(image))
    assert torch.isfinite(grad).all(), f"idct_pad[{backend}]: non-finite gradient"


# --- gaussian_sample_kl ---------------------------------------------------------------------------------------------
LOGVARS = {torch.float32: [-30.0, 30.0, -10.0, 1.0, 0.0], torch.bfloat16: [-30.0, 30.0, -10.0, 1.0, 0.0],
           # fp16 tops out at 65504: z = mu + e^(lv/2) eps overflows for lv = 30, so +-30 becomes -30 / +10.
           torch.float16: [-30.0, 10.0, -10.0, 1.0, 0.0]}


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, shape=st.sampled_from([(1, 1, 7, 7), (3, 2, 5, 5), (2, 37), (5,)]), dtype=st.sampled_from(DTYPES),
       fraction=fractions, mean_scale=st.sampled_from([1.0, 1e3]), given_noise=st.booleans())
def test_gaussian_sample_kl_matches_the_fallback_at_extreme_log_variances(backend, seed, shape, dtype, fraction,
                                                                          mean_scale, given_noise):
    dev = device_for(backend)
    lv = LOGVARS[dtype]
    mu_q, mu_p = (filled(seed + i, shape, mean_scale, [-mean_scale, mean_scale, 0.0], fraction) for i in (1, 2))
    lv_q, lv_p = (filled(seed + i, shape, 3.0, lv, fraction).clamp(min(lv), max(lv)) for i in (3, 4))
    inputs = [t.to(dtype=dtype, device=dev).requires_grad_() for t in (mu_q, lv_q, mu_p, lv_p)]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = noise.to(dtype=dtype, device=dev) if given_noise else None
    z, kl = ops.gaussian_sample_kl(*inputs, noise, backend=backend)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    z_ref, kl_ref = ops.gaussian_sample_kl(*fresh, noise, backend="torch")
    assert_close(kl, kl_ref, 2e-5, f"kl[{backend}]")
    assert torch.isfinite(z).all(), f"z[{backend}]: non-finite"
    if noise is None:
        return  # each backend draws its own eps: z is checked for finiteness only
    assert_close(z, z_ref, TOL[dtype], f"z[{backend}]")
    if dtype == torch.float16:
        return  # gradients ~ e^(lv_q - lv_p) / 2 are finite in math but beyond fp16's range
    dz, dkl = torch.randn_like(z), torch.randn_like(kl)
    grads = torch.autograd.grad([z, kl], inputs, [dz, dkl])
    grads_ref = torch.autograd.grad([z_ref, kl_ref], fresh, [dz, dkl])
    for name, g, g_ref in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads, grads_ref):
        assert_close(g, g_ref, TOL[dtype], f"d {name}[{backend}]")


# --- dml_log_prob and dml_sample ------------------------------------------------------------------------------------
def dml_inputs(seed, batch, height, width, num_mix, fraction, dtype, dev):
    """x on the 256-level grid (with many exact 0 and 255 pixels) and extreme mixture parameters."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (batch, 3, height, width), generator=g)
    edge = torch.rand(levels.shape, generator=g) < fraction
    levels = torch.where(edge, torch.randint(0, 2, levels.shape, generator=g) * 255, levels)
    x = (levels.double() / 127.5 - 1.0).to(dtype=dtype, device=dev)
    m = num_mix
    logits = filled(seed + 1, (batch, m, height, width), 1.0, [-1e4, 1e4], fraction)
    means = filled(seed + 2, (batch, 3, m, height, width), 1.0, [-50.0, 50.0, -1.0, 1.0], fraction)
    # -8 and 1 sit exactly on the likelihood's log-scale clamps.
    log_scales = filled(seed + 3, (batch, 3, m, height, width), 2.0, [-20.0, -8.0, 1.0, 5.0], fraction)
    coeffs = filled(seed + 4, (batch, 3, m, height, width), 1.0, [-1e4, 1e4], fraction)
    rest = torch.cat([means, log_scales, coeffs], dim=2).reshape(batch, 9 * m, height, width)
    params = torch.cat([logits, rest], dim=1).to(dtype=dtype, device=dev)
    return x, params


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, batch=st.integers(1, 2), height=st.integers(1, 4), width=st.integers(1, 4),
       num_mix=st.sampled_from([1, 3, 10]), fraction=fractions, dtype=st.sampled_from(DTYPES))
def test_dml_log_prob_matches_the_fallback_for_huge_logits_and_far_means(backend, seed, batch, height, width,
                                                                        num_mix, fraction, dtype):
    dev = device_for(backend)
    x, params = dml_inputs(seed, batch, height, width, num_mix, fraction, dtype, dev)
    params.requires_grad_()
    logp = ops.dml_log_prob(x, params, num_mix, backend=backend)
    ref = ops.dml_log_prob(x, params.detach(), num_mix, backend="torch")
    assert logp.shape == (batch,)
    # Bins whose mass is near the 1e-10 floor may fall on the other side of it in another backend's
    # rounding; log(max(mass, 1e-10)) is continuous there, so log p barely moves.
    assert_close(logp, ref, 1e-4, f"dml_log_prob[{backend}]", floor=1.0)
    (grad,) = torch.autograd.grad(logp, params, torch.randn_like(logp))
    assert torch.isfinite(grad).all(), f"dml_log_prob[{backend}]: non-finite gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, batch=st.integers(1, 2), height=st.integers(1, 4), width=st.integers(1, 4),
       num_mix=st.sampled_from([1, 3, 10]), fraction=fractions, dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([0.0, 1.0, 100.0]))
def test_dml_sample_stays_on_the_pixel_grid_for_extreme_parameters(backend, seed, batch, height, width, num_mix,
                                                                  fraction, dtype, temperature):
    dev = device_for(backend)
    _, params = dml_inputs(seed, batch, height, width, num_mix, fraction, dtype, dev)
    x = ops.dml_sample(params, temperature, num_mix, backend=backend)
    assert x.shape == (batch, 3, height, width) and torch.isfinite(x).all()
    levels = (x.double() + 1.0) * 127.5
    assert levels.min() >= 0 and levels.max() <= 255
    assert (levels - levels.round()).abs().max() < 1e-3 * 255


# --- conv1x1 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if _backend.implements("conv1x1", b)])  # not Triton: cuDNN's
@SETTINGS
@given(seed=seeds, batch=st.integers(1, 3), cin=st.integers(1, 9), cout=st.integers(1, 9), side=st.integers(1, 50),
       silu=st.booleans(), dtype=st.sampled_from(DTYPES), fraction=fractions)
def test_conv1x1_matches_the_fallback_where_silu_saturates(backend, seed, batch, cin, cout, side, silu, dtype,
                                                           fraction):
    """Inputs of +-1e4 and +-100 (SiLU's exponential far beyond float range) and exact zeros."""
    dev = device_for(backend)
    x = filled(seed, (batch, cin, side, side), 3.0, [-1e4, 1e4, -100.0, 100.0, 0.0], fraction)
    x = x.to(dtype=dtype, device=dev).requires_grad_()
    weight = filled(seed + 1, (cout, cin, 1, 1), 1.0, [], 0.0).to(dtype=dtype, device=dev).requires_grad_()
    bias = filled(seed + 2, (cout,), 1.0, [], 0.0).to(dtype=dtype, device=dev).requires_grad_()
    y = ops.conv1x1(x, weight, bias, silu=silu, backend=backend)
    fresh = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y_ref = ops.conv1x1(*fresh, silu=silu, backend="torch")
    if not torch.isfinite(y_ref).all():  # float16: W x for x = 1e4 can pass 65504 in the math itself
        assert dtype == torch.float16, f"conv1x1: the fallback overflowed in {dtype}"
        return
    assert_close(y, y_ref, 2 * TOL[dtype], f"conv1x1[{backend}]")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    for name, a, e in zip(("x", "weight", "bias"), torch.autograd.grad(y, [x, weight, bias], g),
                          torch.autograd.grad(y_ref, fresh, g)):
        if not torch.isfinite(e).all():  # float16: sums of g x over the image pass 65504 in the math itself
            assert dtype == torch.float16, f"d {name}: the fallback overflowed in {dtype}"
            continue
        assert_close(a, e, 2 * TOL[dtype], f"d {name}[{backend}]")
