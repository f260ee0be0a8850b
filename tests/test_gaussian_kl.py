"""gaussian_sample_kl (+ the grouped form) on every backend, against the fallback and a float64 oracle.

The oracle is the closed form written with standard deviations,
KL = log(s_p / s_q) + (s_q^2 + (mu_q - mu_p)^2) / (2 s_p^2) - 1/2, in float64;
its gradients come from float64 autograd, independent of any backend's
hand-written backward.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from dvp_fast import ops
from helpers import as_float64, device_for, skip_unless_implemented
from oracles import gaussian_kl_oracle

pytestmark = pytest.mark.usefixtures("nan_filled_allocations")

# Largest error relative to the largest magnitude of the expected tensor, per input dtype.
# kl is always fp32 arithmetic on the (rounded) inputs; z and the input gradients carry the input dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
TOL[torch.float64] = TOL[torch.float32]  # accepted and returned as float64; the math is fp32 on every backend
KL_TOL = 2e-5
DTYPES = list(TOL)
# Batch 1, 7 x 7 and 5 x 5 latents, CIFAR-like 14 x 14 x 3, a flat non-power-of-two row and a 1-D batch.
SHAPES = [(1, 1, 7, 7), (3, 2, 5, 5), (2, 3, 14, 14), (4, 37), (5,)]
LV_MODEL_RANGE = (-10.0, 1.0)  # the model's hard clamp of both log-variances
















def assert_close(actual, expected, tol: float, what: str) -> None:
    """Max error relative to the largest expected magnitude."""
    actual64, expected = as_float64(actual), as_float64(expected)
    assert np.isfinite(actual64).all(), f"{what}: non-finite elements (an output element was never written?)"
    err = np.abs(actual64 - expected).max() / max(np.abs(expected).max(), 1e-30)
    assert err <= tol, f"{what}: max error {err:.3g} relative to max |expected|, tolerance {tol:.3g}"


def assert_close_elementwise(actual, expected, tol: float, what: str) -> None:
    """Error relative to each element: for inputs whose magnitudes span many decades."""
    actual64, expected = as_float64(actual), as_float64(expected)
    assert np.isfinite(actual64).all(), f"{what}: non-finite elements"
    err = (np.abs(actual64 - expected) / (np.abs(expected) + 1e-30)).max()
    assert err <= tol, f"{what}: max elementwise relative error {err:.3g}, tolerance {tol:.3g}"


# --- the float64 oracle ------------------------------------------------------------------------------
def oracle(mu_q, lv_q, mu_p, lv_p, eps, dz, dkl):
    """(z, kl, [d mu_q, d lv_q, d mu_p, d lv_p]) in float64 for L = sum(dz z) + sum(dkl kl)."""
    z, kl, leaves = gaussian_kl_oracle(mu_q, lv_q, mu_p, lv_p, eps)
    loss = (z * torch.as_tensor(as_float64(dz))).sum() + (kl * torch.as_tensor(as_float64(dkl))).sum()
    grads = torch.autograd.grad(loss, leaves)
    return z.detach().numpy(), kl.detach().numpy(), [g.numpy() for g in grads]


def random_inputs(shape, dtype, device, lv_range=LV_MODEL_RANGE):
    lo, hi = lv_range
    mu_q, mu_p = torch.randn(shape), torch.randn(shape)
    lv_q, lv_p = torch.empty(shape).uniform_(lo, hi), torch.empty(shape).uniform_(lo, hi)
    return [t.to(dtype=dtype, device=device).requires_grad_() for t in (mu_q, lv_q, mu_p, lv_p)]


def run(backend, inputs, noise, dz=None, dkl=None):
    """(z, kl, grads of the four inputs) with random incoming gradients (drawn here when not given)."""
    z, kl = ops.gaussian_sample_kl(*inputs, noise, backend=backend)
    dz = torch.randn_like(z) if dz is None else dz
    dkl = torch.randn_like(kl) if dkl is None else dkl
    grads = torch.autograd.grad([z, kl], inputs, [dz, dkl])
    return z, kl, list(grads), dz, dkl


# --- explicit noise ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(backend, shape, dtype):
    dev = device_for(backend)
    # fp16 gradients overflow (> 65504) for logvar_p near -10 whatever the backend: use a narrower range.
    inputs = random_inputs(shape, dtype, dev, lv_range=(-4.0, 1.0) if dtype == torch.float16 else LV_MODEL_RANGE)
    noise = torch.randn(shape, dtype=dtype, device=dev)
    z, kl, grads, dz, dkl = run(backend, inputs, noise)
    assert z.dtype == dtype and z.shape == shape and kl.dtype == torch.float32 and kl.shape == shape[:1]

    z_ref, kl_ref, grads_ref = oracle(*inputs, noise, dz, dkl)
    assert_close(z, z_ref, TOL[dtype], "z vs float64 oracle")
    assert_close(kl, kl_ref, KL_TOL, "kl vs float64 oracle")
    for name, g, g_ref in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, g_ref, TOL[dtype], f"d {name} vs float64 oracle")

    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    z_fb, kl_fb, grads_fb, _, _ = run("torch", fresh, noise, dz, dkl)
    assert_close(z, z_fb, TOL[dtype], "z vs fallback")
    assert_close(kl, kl_fb, KL_TOL, "kl vs fallback")
    for name, g, g_fb in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads, grads_fb):
        assert_close(g, g_fb, TOL[dtype], f"d {name} vs fallback")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_log_variances(backend, dtype):
    """Every pairing of log-variances from {-30, -10, 1, 30} (the model clamps to [-10, 1]), one per row."""
    dev = device_for(backend)
    levels = [-30.0, LV_MODEL_RANGE[0], LV_MODEL_RANGE[1], 30.0]
    pairs = torch.tensor([(a, b) for a in levels for b in levels])  # (16, 2)
    n = 6
    lv_q = pairs[:, :1].expand(-1, n).contiguous()
    lv_p = pairs[:, 1:].expand(-1, n).contiguous()
    mu_q, mu_p, noise = torch.randn(16, n), torch.randn(16, n), torch.randn(16, n)
    inputs = [t.to(dtype=dtype, device=dev).requires_grad_() for t in (mu_q, lv_q, mu_p, lv_p)]
    noise = noise.to(dtype=dtype, device=dev)
    z, kl, grads, dz, dkl = run(backend, inputs, noise)
    z_ref, kl_ref, grads_ref = oracle(*inputs, noise, dz, dkl)
    m_q, l_q, m_p, l_p, eps = (as_float64(t) for t in (*inputs, noise))
    # Values span 1e-13 .. 1e26, so errors are measured against the magnitude of what was summed:
    # fp32 cannot resolve a KL of 1e-13 out of terms of size 1 (lv_q = lv_p = 30).
    terms = 0.5 * (np.abs(l_p) + np.abs(l_q) + (np.exp(l_q) + (m_q - m_p) ** 2) * np.exp(-l_p) + 1.0)
    kl_err = np.abs(as_float64(kl) - kl_ref) / terms.sum(1)
    assert np.isfinite(as_float64(kl)).all() and kl_err.max() <= 1e-6, kl_err.max()
    z_err = np.abs(as_float64(z) - z_ref) / (np.abs(m_q) + np.exp(0.5 * l_q) * np.abs(eps))
    assert np.isfinite(as_float64(z)).all() and z_err.max() <= (1e-6 if dtype == torch.float32 else 8e-3), z_err.max()
    # Each gradient against the sum of the magnitudes of its terms (it cancels to ~0 when q = p).
    d_z, d_kl = np.abs(as_float64(dz)), np.abs(as_float64(dkl))[:, None]
    ratio, shift = np.exp(l_q - l_p), (m_q - m_p) ** 2 * np.exp(-l_p)
    magnitudes = [d_z + d_kl * np.sqrt(shift * np.exp(-l_p)),
                  0.5 * (d_z * np.exp(0.5 * l_q) * np.abs(eps) + d_kl * (ratio + 1.0)),
                  d_kl * np.sqrt(shift * np.exp(-l_p)),
                  0.5 * d_kl * (1.0 + ratio + shift)]
    for name, g, g_ref, mag in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads, grads_ref, magnitudes):
        err = np.abs(as_float64(g) - g_ref) / np.maximum(mag, 1e-30)
        assert np.isfinite(as_float64(g)).all() and err.max() <= TOL[dtype], (name, err.max())


# --- in-kernel noise ---------------------------------------------------------------------------------
def test_noise_none_is_reproducible_and_standard_normal(backend):
    dev = device_for(backend)
    shape = (4, 3, 16, 16)
    mu, logvar = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    torch.manual_seed(7)
    z1, kl1 = ops.gaussian_sample_kl(mu, logvar, mu, logvar, backend=backend)
    torch.manual_seed(7)
    z2, _ = ops.gaussian_sample_kl(mu, logvar, mu, logvar, backend=backend)
    z3, _ = ops.gaussian_sample_kl(mu, logvar, mu, logvar, backend=backend)
    assert torch.equal(z1, z2), "same torch seed must give the same z"
    assert not torch.equal(z2, z3), "consecutive draws must differ"
    assert torch.isfinite(z1).all() and torch.equal(kl1, torch.zeros_like(kl1))
    # With mu = 0 and logvar = 0, z is the noise itself: test it is N(0, 1).
    eps = as_float64(z1).ravel()
    assert scipy.stats.kstest(eps, "norm").pvalue > 1e-3
    # Neighbouring elements must not be correlated (a counter/offset bug would repeat or pair values).
    assert abs(np.corrcoef(eps[:-1], eps[1:])[0, 1]) < 4.0 / math.sqrt(eps.size)
    assert np.unique(eps).size == eps.size


def test_noise_none_backward_regenerates_the_same_noise(backend):
    """Gradients with drawn noise equal those of the explicit path fed the noise that was drawn."""
    dev = device_for(backend)
    shape = (3, 2, 7, 7)
    inputs = random_inputs(shape, torch.float32, dev, lv_range=(-2.0, 1.0))
    z, kl, grads, dz, dkl = run(backend, inputs, None)
    mu_q, lv_q = as_float64(inputs[0]), as_float64(inputs[1])
    eps = torch.as_tensor((as_float64(z) - mu_q) * np.exp(-0.5 * lv_q), dtype=torch.float32, device=dev)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    _, kl_explicit, grads_explicit, _, _ = run(backend, fresh, eps, dz, dkl)
    assert_close(kl, kl_explicit, 1e-6, "kl does not depend on the noise")
    for name, g, g_explicit in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads, grads_explicit):
        assert_close(g, g_explicit, 1e-5, f"d {name}: noise=None vs explicit noise")
    _, _, grads_ref = oracle(*inputs, eps, dz, dkl)
    assert_close(grads[1], grads_ref[1], 1e-5, "d logvar_q vs float64 oracle")


def test_noise_gradient(backend):
    """A noise tensor that requires grad gets dz * e^(logvar_q / 2), like the fallback."""
    dev = device_for(backend)
    inputs = random_inputs((2, 3, 5, 5), torch.float32, dev)
    noise = torch.randn(2, 3, 5, 5, device=dev, requires_grad=True)
    z, kl = ops.gaussian_sample_kl(*inputs, noise, backend=backend)
    dz = torch.randn_like(z)
    (dnoise,) = torch.autograd.grad(z, noise, dz)
    assert_close(dnoise, as_float64(dz) * np.exp(0.5 * as_float64(inputs[1])), 1e-6, "d noise")


# --- grouped -----------------------------------------------------------------------------------------
LAYER_SHAPES = [(3, 4, 4), (3, 8, 8), (1, 7, 7), (2, 2, 2), (3, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_grouped(backend, batch, dtype):
    skip_unless_implemented(backend, "gaussian_sample_kl_grouped")
    dev = device_for(backend)
    layers = [random_inputs((batch, *s), dtype, dev, lv_range=(-2.0, 1.0)) for s in LAYER_SHAPES]
    torch.manual_seed(11)
    zs, kl = ops.gaussian_sample_kl_grouped([tuple(layer) for layer in layers], backend=backend)
    assert kl.shape == (batch, len(layers)) and kl.dtype == torch.float32
    assert [z.shape for z in zs] == [(batch, *s) for s in LAYER_SHAPES] and all(z.dtype == dtype for z in zs)
    torch.manual_seed(11)
    zs_again, _ = ops.gaussian_sample_kl_grouped([tuple(layer) for layer in layers], backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(zs, zs_again)), "same torch seed must give the same z"

    dzs = [torch.randn_like(z) for z in zs]
    dkl = torch.randn_like(kl)
    leaves = [t for layer in layers for t in layer]
    grads = torch.autograd.grad(list(zs) + [kl], leaves, dzs + [dkl])
    all_eps = []
    for i, (layer, z, dz) in enumerate(zip(layers, zs, dzs)):
        eps = (as_float64(z) - as_float64(layer[0])) * np.exp(-0.5 * as_float64(layer[1]))
        all_eps.append(eps.ravel())
        z_ref, kl_ref, grads_ref = oracle(*layer, eps, dz, dkl[:, i])
        assert_close(kl[:, i], kl_ref, KL_TOL, f"layer {i} kl")
        for name, g, g_ref in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads[4 * i:4 * i + 4], grads_ref):
            assert g.dtype == dtype
            # bf16: eps recovered from a bf16 z carries its rounding into d logvar_q.
            assert_close(g, g_ref, TOL[dtype] * (4 if dtype == torch.bfloat16 else 1), f"layer {i} d {name}")
    eps = np.concatenate(all_eps)
    if dtype == torch.float32:
        assert scipy.stats.kstest(eps, "norm").pvalue > 1e-3
        assert np.unique(eps).size == eps.size, "layers must not share noise"


def test_grouped_kl_matches_per_layer_fallback(backend):
    skip_unless_implemented(backend, "gaussian_sample_kl_grouped")
    dev = device_for(backend)
    layers = [tuple(random_inputs((2, *s), torch.float32, dev)) for s in LAYER_SHAPES]
    _, kl = ops.gaussian_sample_kl_grouped(layers, backend=backend)
    _, kl_fb = ops.gaussian_sample_kl_grouped(layers, backend="torch")
    assert_close(kl, kl_fb, KL_TOL, "grouped kl vs fallback")


@pytest.mark.parametrize("used", ["z", "kl"])
def test_grouped_backward_with_one_output_unused(backend, used):
    """Backward through only the z outputs (kl unused), or only kl: the gradients equal the fallback's
    fed the same noise, and are exactly 0 where the used output does not depend on the input
    (mu_p and logvar_p when only z is used). An unused output's gradient arrives as None and must be
    replaced by zeros of the output's own shape (kl is (B, L) in the grouped form, not (B,))."""
    skip_unless_implemented(backend, "gaussian_sample_kl_grouped")
    dev = device_for(backend)
    batch = 3
    layers = [random_inputs((batch, *s), torch.float32, dev, lv_range=(-2.0, 1.0)) for s in LAYER_SHAPES]
    zs, kl = ops.gaussian_sample_kl_grouped([tuple(layer) for layer in layers], backend=backend)
    leaves = [t for layer in layers for t in layer]
    outputs, incoming = (list(zs), [torch.randn_like(z) for z in zs]) if used == "z" else ([kl], [torch.randn_like(kl)])
    grads = torch.autograd.grad(outputs, leaves, incoming, allow_unused=True)
    for i, (layer, z) in enumerate(zip(layers, zs)):
        # The fallback, one layer at a time, fed the noise this backend drew.
        eps = torch.as_tensor((as_float64(z) - as_float64(layer[0])) * np.exp(-0.5 * as_float64(layer[1])),
                              dtype=torch.float32, device=dev)
        fresh = [t.detach().clone().requires_grad_() for t in layer]
        z_fb, kl_fb = ops.gaussian_sample_kl(*fresh, eps, backend="torch")
        out_fb, in_fb = (z_fb, incoming[i]) if used == "z" else (kl_fb, incoming[0][:, i])
        grads_fb = torch.autograd.grad(out_fb, fresh, in_fb, allow_unused=True)
        for name, g, g_fb in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads[4 * i:4 * i + 4], grads_fb):
            g = torch.zeros_like(layer[0]) if g is None else g
            if g_fb is None:  # the used output does not depend on this input
                assert torch.equal(g, torch.zeros_like(g)), \
                    f"layer {i} d {name} must be exactly 0 (max |g| = {g.abs().max().item():.3g})"
            else:
                assert_close(g, g_fb, 1e-5, f"layer {i} d {name} vs fallback ({used} used only)")
