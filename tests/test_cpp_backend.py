"""The native CPU kernels (backend="cpp"): numerics, determinism, and the build machinery.

Numerics: every op against the PyTorch fallback and against the float64 oracles of tests/oracles.py
(scipy's DCT, the closed-form Gaussian KL, a direct reference-form DML likelihood; conv1x1's oracle
check is in test_conv1x1.py, which runs every backend), forward and backward with random
upstream gradients, on odd shapes and edge values, float32 and bfloat16.
Oracle gradients come from float64 autograd (or scipy for the linear DCT), independent of the
hand-written backward kernels. Determinism: results are bitwise equal with 1 and 2 threads.
Build: no compiler, no ninja or no writable cache gives one warning and the fallback; a compile
error carries the compiler's message; concurrent first builds into one cache do not corrupt it.
"""
import os
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from dvp_fast import ops
from dvp_fast.ops import _backend
from dvp_fast.ops.dct import dct_scale_bound
from helpers import as_float64 as f64
from helpers import assert_close
from oracles import (dct_crop_grads_oracle, dct_crop_oracle, dml_log_prob_oracle, gaussian_kl_oracle,
                     idct_pad_grads_oracle, idct_pad_oracle)

# Max error relative to the largest |expected|, per input dtype: fp32 arithmetic, and for
# bf16 the rounding of outputs and gradients to bf16 (8 bits of mantissa).
TOL = {torch.float32: 3e-5, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)


@pytest.fixture(scope="module")
def cpp():
    """The cpp backend; fails (not skips) when a toolchain is present but the build does not work."""
    ok, why = _backend.availability("cpp")
    if not ok:
        import shutil

        from torch.utils.cpp_extension import is_ninja_available

        if shutil.which(os.environ.get("CXX", "c++")) and is_ninja_available():
            pytest.fail(f"a C++ toolchain is present but the cpp backend is unavailable: {why}")
        pytest.skip(f"no C++ toolchain here: {why}")
    return "cpp"


def rel_err(actual, expected) -> float:
    a, e = f64(actual), f64(expected)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def assert_agrees_with_fallback(actual, fallback, oracle, tol: float, what: str) -> None:
    """cpp and the fp32 fallback agree to within tol plus the fallback's own error against the
    float64 oracle (where the fallback's fp32 formula loses digits, e.g. a difference of two
    sigmoids near 1, the kernel is the more accurate of the two)."""
    assert_close(actual, fallback, tol + rel_err(fallback, oracle), f"{what} vs fallback")


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run(fn, inputs, seed=None):
    """Outputs of fn(*inputs) and the gradients of sum(g * out) for fixed random g (seeded)."""
    outs = fn(*inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    gen = torch.Generator().manual_seed(1234 if seed is None else seed)
    gouts = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], gouts)
    return outs, list(grads), gouts


# ------------------------------------------------------------------------------------- DCT
# (B, C, D, d): batch 1, MNIST and CIFAR sizes, pseudo-input sides 5 and 7.
DCT_SHAPES = [(1, 1, 28, 7), (2, 3, 32, 5), (3, 3, 32, 7), (2, 1, 28, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DCT_SHAPES, ids=str)
def test_dct_crop(cpp, nan_filled_allocations, shape, dtype):
    b, c, size, d = shape
    x = (torch.rand(b, c, size, size) * 2 - 1).to(dtype)
    x[0, 0, :, : size // 2] = 1.0  # white and black regions: pixels at both ends of [-1, 1]
    x[-1, -1, : size // 2] = -1.0
    scale = dct_scale_bound(c, d, size) * torch.empty(c, d, d).uniform_(0.05, 0.6)  # many clamped, many not
    y_ref, raw = dct_crop_oracle(f64(x), f64(scale))
    assert ((raw > 1) | (raw < -1)).any() and (abs(raw) < 1).any(), "inputs must exercise both sides of the clamp"
    out = {}
    for backend in ("cpp", "torch"):
        out[backend] = run(lambda a, s: ops.dct_crop(a, s, backend=backend), leaves(x, scale))
    (y,), (gx, gs), (g,) = out["cpp"]
    assert y.dtype == dtype and gx.dtype == dtype
    gx_ref, gs_ref = dct_crop_grads_oracle(raw, f64(scale), f64(g), size, edges_pass=False)
    assert_close(y, y_ref, TOL[dtype], "y vs scipy")
    assert_close(gx, gx_ref, TOL[dtype], "d x vs scipy")
    assert_close(gs, gs_ref, TOL[dtype], "d scale vs oracle")
    (y_fb,), (gx_fb, gs_fb), _ = out["torch"]
    assert_agrees_with_fallback(y, y_fb, y_ref, TOL[dtype], "y")
    assert_agrees_with_fallback(gx, gx_fb, gx_ref, TOL[dtype], "d x")
    assert_agrees_with_fallback(gs, gs_fb, gs_ref, TOL[dtype], "d scale")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DCT_SHAPES, ids=str)
def test_idct_pad(cpp, nan_filled_allocations, shape, dtype):
    b, c, size, d = shape
    scale = dct_scale_bound(c, d, size) * 0.5
    u = (torch.rand(b, c, d, d) * 2 - 1).to(dtype)
    u[0, 0] = 1.0  # saturates: the image leaves [0, 1]
    img_ref, img = idct_pad_oracle(f64(u), f64(scale), size)
    assert ((img > 1) | (img < 0)).any() and ((img > 0) & (img < 1)).any()
    out = {}
    for backend in ("cpp", "torch"):
        out[backend] = run(lambda a, s: ops.idct_pad(a, s, size, backend=backend), leaves(u, scale))
    (x,), (gu, gs), (g,) = out["cpp"]
    assert x.shape == (b, c, size, size) and x.dtype == dtype and gu.dtype == dtype
    gu_ref, gs_ref = idct_pad_grads_oracle(f64(u), f64(scale), img, f64(g), edges_pass=False)
    assert_close(x, img_ref, TOL[dtype], "image vs scipy")
    assert_close(gu, gu_ref, TOL[dtype], "d u vs scipy")
    assert_close(gs, gs_ref, TOL[dtype], "d scale vs oracle")
    for a, e, ref, what in zip((x, gu, gs), (out["torch"][0][0], *out["torch"][1]), (img_ref, gu_ref, gs_ref),
                               ("image", "d u", "d scale")):
        assert_agrees_with_fallback(a, e, ref, TOL[dtype], what)


# ------------------------------------------------------------------------------ Gaussian KL
def kl_magnitudes(mu_q, lv_q, mu_p, lv_p, eps, gz, gk):
    """Per-element size of the terms that make up z, the kl row and each gradient (float64): the
    log-variances span e^-30..e^30, so errors are judged against the terms, not the largest output."""
    mu_q, lv_q, mu_p, lv_p, eps, gz = map(f64, (mu_q, lv_q, mu_p, lv_p, eps, gz))
    gk = f64(gk).reshape((-1,) + (1,) * (mu_q.ndim - 1))
    sd, inv_var_p, diff2 = np.exp(0.5 * lv_q), np.exp(-lv_p), (mu_q - mu_p) ** 2
    kl_row = 0.5 * (np.abs(lv_p) + np.abs(lv_q) + (sd * sd + diff2) * inv_var_p + 1.0)
    return (np.abs(mu_q) + sd * np.abs(eps), kl_row.reshape(len(mu_q), -1).sum(1),
            [np.abs(gz) + np.abs(gk) * np.sqrt(diff2) * inv_var_p,
             0.5 * np.abs(gz) * sd * np.abs(eps) + 0.5 * np.abs(gk) * (sd * sd * inv_var_p + 1.0),
             np.abs(gk) * np.sqrt(diff2) * inv_var_p,
             0.5 * np.abs(gk) * (1.0 + (sd * sd + diff2) * inv_var_p)])


def assert_close_to_terms(actual, expected, magnitude, tol: float, what: str) -> None:
    a, e = f64(actual), f64(expected)
    assert np.isfinite(a).all(), f"{what}: non-finite elements (never written?)"
    err = (np.abs(a - e) / np.maximum(magnitude, 1e-30)).max()
    assert err <= tol, f"{what}: max error {err:.3g} relative to the size of its terms, tolerance {tol:.3g}"


# Batch 1, the four CIFAR latent resolutions, an odd flat row, and one row longer than a chunk.
KL_SHAPES = [(1, 3, 4, 4), (4, 3, 8, 8), (2, 3, 32, 32), (3, 37), (2, 3, 40, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=str)
def test_gaussian_sample_kl(cpp, nan_filled_allocations, shape, dtype):
    mu_q, mu_p = torch.randn(shape) * 2, torch.randn(shape) * 2
    lv_q, lv_p = torch.empty(shape).uniform_(-6, 3), torch.empty(shape).uniform_(-6, 3)
    lv_q.view(-1)[:4] = torch.tensor([30.0, -30.0, 30.0, -30.0])  # extreme log-variances, in row 0
    lv_p.view(-1)[:4] = torch.tensor([-30.0, 30.0, 30.0, -30.0])
    noise = torch.randn(shape)
    inputs = [t.to(dtype) for t in (mu_q, lv_q, mu_p, lv_p)]
    (z, kl), grads, (gz, gk) = run(lambda *a: ops.gaussian_sample_kl(*a, noise, backend="cpp"), leaves(*inputs))
    assert z.dtype == dtype and kl.dtype == torch.float32 and kl.shape == (shape[0],)
    z_ref, kl_ref, t = gaussian_kl_oracle(*inputs, noise)
    grads_ref = torch.autograd.grad([z_ref, kl_ref], t, [torch.as_tensor(f64(gz)), torch.as_tensor(f64(gk))])
    z_mag, kl_mag, grad_mags = kl_magnitudes(*inputs, noise, gz, gk)
    # z and the gradients are stored in the input dtype; kl is fp32 arithmetic on the rounded inputs.
    assert_close_to_terms(z, z_ref, z_mag, TOL[dtype], "z vs oracle")
    assert_close_to_terms(kl, kl_ref, kl_mag, 1e-6, "kl vs oracle")
    for name, g, g_ref, mag in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), grads, grads_ref, grad_mags):
        assert g.dtype == dtype
        assert_close_to_terms(g, g_ref, mag, TOL[dtype], f"d {name} vs oracle")
    (z_fb, kl_fb), grads_fb, _ = run(lambda *a: ops.gaussian_sample_kl(*a, noise, backend="torch"), leaves(*inputs))
    assert_close_to_terms(z, z_fb, z_mag, TOL[dtype], "z vs fallback")
    assert_close_to_terms(kl, kl_fb, kl_mag, 1e-6, "kl vs fallback")
    for g, g_fb, mag in zip(grads, grads_fb, grad_mags):
        assert_close_to_terms(g, g_fb, mag, TOL[dtype], "grads vs fallback")


def test_gaussian_noise_is_the_fallback_draw(cpp):
    """noise=None draws from torch's generator exactly as the fallback does: same seed, same z."""
    layers = [tuple(torch.randn(3, *s) for _ in range(4)) for s in [(3, 4, 4), (3, 8, 8), (7,)]]
    for seed in (0, 5):
        torch.manual_seed(seed)
        zs_cpp, kl_cpp = ops.gaussian_sample_kl_grouped(layers, backend="cpp")
        torch.manual_seed(seed)
        zs_fb, kl_fb = ops.gaussian_sample_kl_grouped(layers, backend="torch")
        for z, z_fb in zip(zs_cpp, zs_fb):
            assert_close(z, z_fb, 1e-6, f"z, seed {seed}")
        assert_close(kl_cpp, kl_fb, 1e-6, "kl")
    torch.manual_seed(1)
    z1, _ = ops.gaussian_sample_kl(*layers[0], backend="cpp")
    z2, _ = ops.gaussian_sample_kl(*layers[0], backend="cpp")
    assert not torch.equal(z1, z2)


def test_gaussian_grouped_backward_with_unused_outputs(cpp, nan_filled_allocations):
    """Only kl used (z of some layers unused), noise drawn inside: gradients match the fallback."""
    layers = [leaves(*(torch.randn(2, *s) for _ in range(4))) for s in [(3, 4, 4), (1, 7, 7), (5,)]]
    grads = {}
    for backend in ("cpp", "torch"):
        torch.manual_seed(3)
        fresh = [leaves(*layer) for layer in layers]
        zs, kl = ops.gaussian_sample_kl_grouped([tuple(layer) for layer in fresh], backend=backend)
        loss = (kl * torch.arange(1.0, 4.0)).sum() + zs[1].square().sum()
        grads[backend] = torch.autograd.grad(loss, [t for layer in fresh for t in layer], allow_unused=True)
    for g, g_fb in zip(grads["cpp"], grads["torch"]):
        assert_close(g, g_fb, 1e-5, "grad")


# ---------------------------------------------------------------------- mixture of logistics
def dml_inputs(b, h, w, num_mix, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=gen).float() / 127.5 - 1.0
    x[:, :, 0, :] = -1.0  # level 0 ...
    x[:, :, -1, :] = 1.0  # ... and level 255 on whole rows
    params = torch.randn(b, 10 * num_mix, h, w, generator=gen)
    rest = params[:, num_mix:].view(b, 3, 3 * num_mix, h, w)
    rest[:, :, num_mix:2 * num_mix] = torch.empty(b, 3, num_mix, h, w).uniform_(-9.0, 1.5, generator=gen)
    rest[:, 0, num_mix, 1, :] = -8.0  # exactly on the log-scale clamps: no gradient there
    rest[:, 1, num_mix, 1, :] = 1.0
    params[:, :num_mix] *= 3.0  # peaked mixture weights
    return x, params.to(dtype)


def dml_regimes(x, params, num_mix):
    """Counts of (left edge, right edge, interior, mass-floor) red sub-pixel bins and of clamped
    (below -8, above 1) log-scales, float64."""
    b, _, h, w = params.shape
    p = params.double()
    rest = p[:, num_mix:].reshape(b, 3, 3 * num_mix, h, w)
    raw = rest[:, :, num_mix:2 * num_mix]
    ls = rest[:, 0, num_mix:2 * num_mix].clamp(-8.0, 1.0)
    xr = x[:, 0:1].double()
    mass = torch.sigmoid((xr - rest[:, 0, :num_mix] + 1 / 255) / ls.exp()) - torch.sigmoid(
        (xr - rest[:, 0, :num_mix] - 1 / 255) / ls.exp())
    inner = (xr.abs() < 0.999).expand_as(mass)
    return [(xr < -0.999).sum().item(), (xr > 0.999).sum().item(), (inner & (mass > 1e-10)).sum().item(),
            (inner & (mass <= 1e-10)).sum().item(), (raw < -8.0).sum().item(), (raw > 1.0).sum().item()]


# Batch 1, MNIST and CIFAR sides, and 5 x 7 (35 pixels: a partial chunk).
DML_SHAPES = [(1, 28, 28), (2, 32, 32), (3, 5, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DML_SHAPES, ids=str)
def test_dml_log_prob(cpp, nan_filled_allocations, shape, dtype):
    num_mix = 10
    x, params = dml_inputs(*shape, num_mix, dtype)
    assert all(n > 0 for n in dml_regimes(x, params, num_mix)), "every branch of the likelihood must be exercised"
    (lp,), (gx, gp), (g,) = run(lambda a, p: ops.dml_log_prob(a, p, num_mix, backend="cpp"), leaves(x, params))
    assert lp.dtype == torch.float32 and gp.dtype == dtype and gx.dtype == torch.float32
    xd, pd = leaves(x.double(), params.double())
    lp_ref = dml_log_prob_oracle(xd, pd, num_mix)[0]
    gx_ref, gp_ref = torch.autograd.grad(lp_ref, [xd, pd], g.double())
    assert_close(lp, lp_ref, 2e-6, "log p vs float64 oracle")  # fp32 math on the (rounded) inputs
    assert_close(gp, gp_ref, TOL[dtype], "d params vs float64 oracle")
    assert_close(gx, gx_ref, TOL[dtype] * 10, "d x vs float64 oracle")  # sums over 10 components
    (lp_fb,), (gx_fb, gp_fb), _ = run(lambda a, p: ops.dml_log_prob(a, p, num_mix, backend="torch"),
                                      leaves(x, params))
    assert_agrees_with_fallback(lp, lp_fb, lp_ref, 2e-6, "log p")
    assert_agrees_with_fallback(gp, gp_fb, gp_ref, TOL[dtype], "d params")
    assert_agrees_with_fallback(gx, gx_fb, gx_ref, TOL[dtype], "d x")


@pytest.mark.parametrize("num_mix", [1, 3])
def test_dml_other_mixture_sizes_and_no_grad(cpp, num_mix):
    x, params = dml_inputs(2, 6, 9, num_mix, torch.float32, seed=num_mix)
    with torch.no_grad():
        lp = ops.dml_log_prob(x, params, num_mix, backend="cpp")
    assert_close(lp, dml_log_prob_oracle(x.double(), params.double(), num_mix)[0], 2e-6, "log p")
    (lp_grad,), _, _ = run(lambda p: ops.dml_log_prob(x, p, num_mix, backend="cpp"), leaves(params))
    assert torch.equal(lp, lp_grad.detach()), "the gradient-writing forward must give the same values"


def test_dml_backward_is_a_rescaling(cpp):
    """The forward writes d log p / d params once; backward scales it by each row's upstream gradient."""
    x, params = dml_inputs(2, 8, 8, 10, torch.float32, seed=3)
    (p,) = leaves(params)
    lp = ops.dml_log_prob(x, p, 10, backend="cpp")
    (g1,) = torch.autograd.grad(lp, p, torch.tensor([1.0, 1.0]), retain_graph=True)
    (g2,) = torch.autograd.grad(lp, p, torch.tensor([-2.0, 0.5]))
    assert torch.equal(g2[0], -2.0 * g1[0]) and torch.equal(g2[1], 0.5 * g1[1])


@pytest.mark.parametrize("temperature", [1.0, 0.4, 0.0])
def test_dml_sample_matches_fallback(cpp, temperature):
    """Same torch seed: the same uniforms, component choices and levels as the fallback."""
    _, params = dml_inputs(2, 9, 11, 10, torch.float32, seed=7)
    params[:, 10:] *= 0.3
    torch.manual_seed(42)
    s_cpp = ops.dml_sample(params, temperature, backend="cpp")
    torch.manual_seed(42)
    s_fb = ops.dml_sample(params, temperature, backend="torch")
    levels = (s_cpp + 1.0) * 127.5
    assert (levels - levels.round()).abs().max() < 1e-3 and s_cpp.abs().max() <= 1.0, "not on the 256 levels"
    # Libm and torch's vectorised math may differ in the last bit, which can move a value
    # sitting on a rounding boundary by one level: allow a handful of those, nothing more.
    assert (s_cpp != s_fb).sum() <= 2 and ((s_cpp - s_fb).abs() <= 1 / 127.5 + 1e-6).all()


# ------------------------------------------------------------------ dtypes through float32
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_other_dtypes_go_through_float32(cpp, dtype):
    x, params = dml_inputs(1, 6, 6, 10, dtype)
    (lp,), (gp,), _ = run(lambda p: ops.dml_log_prob(x.to(dtype), p, 10, backend="cpp"), leaves(params))
    (lp_fb,), (gp_fb,), _ = run(lambda p: ops.dml_log_prob(x.to(dtype), p, 10, backend="torch"), leaves(params))
    assert gp.dtype == dtype
    assert_close(lp, lp_fb, 1e-5, "log p")
    assert_close(gp, gp_fb, 2e-3, "d params")
    u = torch.rand(2, 3, 5, 5, dtype=dtype)
    scale = dct_scale_bound(3, 5, 32).to(dtype)
    assert ops.idct_pad(u, scale, 32, backend="cpp").dtype == dtype
    assert_close(ops.idct_pad(u, scale, 32, backend="cpp"), ops.idct_pad(u, scale, 32, backend="torch"), 2e-3, "idct")


# ------------------------------------------------------------------------------ determinism
def _all_ops_once():
    """Outputs and gradients of every op on inputs large enough to be split over threads."""
    torch.manual_seed(0)
    x, params = dml_inputs(4, 32, 32, 10, torch.float32, seed=5)
    (lp,), (gp,), _ = run(lambda p: ops.dml_log_prob(x, p, 10, backend="cpp"), leaves(params))
    layers = [tuple(leaves(*(torch.randn(8, *s) for _ in range(4)))) for s in [(3, 4, 4), (3, 32, 32), (3, 64, 64)]]
    zs, kl = ops.gaussian_sample_kl_grouped(layers, backend="cpp")  # noise drawn inside
    gen = torch.Generator().manual_seed(1)
    kl_grads = torch.autograd.grad([*zs, kl], [t for layer in layers for t in layer],
                                   [torch.randn(o.shape, generator=gen) for o in (*zs, kl)])
    img = torch.rand(16, 3, 32, 32) * 2 - 1
    scale = dct_scale_bound(3, 7, 32) * 0.3
    (y,), (gimg,), _ = run(lambda a: ops.dct_crop(a, scale, backend="cpp"), leaves(img))
    (im,), (gu,), _ = run(lambda a: ops.idct_pad(a, scale, 32, backend="cpp"), leaves(y.detach()))
    conv = []
    # one chunk (no parallel region: the GEMMs may thread), many, and chunks sized by the thread count
    for batch, side in ((1, 28), (50, 28), (50, 7)):
        feats, weight, bias = torch.randn(batch, 32, side, side), torch.randn(16, 32, 1, 1), torch.randn(16)
        outs, grads, _ = run(lambda *a: ops.conv1x1(*a, silu=True, backend="cpp"), leaves(feats, weight, bias))
        conv += [*outs, *grads]
    return [lp, gp, *zs, kl, *kl_grads, y, gimg, im, gu, *conv]


def test_results_do_not_depend_on_the_thread_count(cpp):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops_once()
        torch.set_num_threads(2)
        two = _all_ops_once()
    finally:
        torch.set_num_threads(before)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the shared dispatcher's
def test_torch_compile_traces_through_without_graph_breaks(cpp):
    """fullgraph=True fails on any graph break; the fake implementations give dynamo the shapes."""
    x, params = dml_inputs(2, 6, 6, 10, torch.float32)
    kl_inputs = [torch.randn(2, 3, 4, 4) for _ in range(5)]
    img, scale = torch.rand(2, 3, 32, 32) * 2 - 1, dct_scale_bound(3, 5, 32)

    conv_weight, conv_bias = torch.randn(4, 3, 1, 1), torch.randn(4)

    def loss(params, img, mu_q, lv_q, mu_p, lv_p, noise):
        z, kl = ops.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, noise, backend="cpp")
        u = ops.dct_crop(img, scale, backend="cpp")
        return (ops.dml_log_prob(x, params, 10, backend="cpp").sum() + kl.sum() + z.square().sum()
                + ops.idct_pad(u, scale, 32, backend="cpp").square().sum()
                + ops.conv1x1(img, conv_weight, conv_bias, silu=True, backend="cpp").square().sum())

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    eager_in, compiled_in = leaves(params, img, *kl_inputs[:4]), leaves(params, img, *kl_inputs[:4])
    eager_loss = loss(*eager_in, kl_inputs[4])
    compiled_loss = compiled(*compiled_in, kl_inputs[4])
    assert torch.equal(eager_loss, compiled_loss)
    for a, b in zip(torch.autograd.grad(eager_loss, eager_in), torch.autograd.grad(compiled_loss, compiled_in)):
        assert torch.equal(a, b)


def test_auto_uses_cpp_for_cpu_tensors(cpp):
    assert _backend.choose_backend("dml_log_prob", "auto", torch.device("cpu")) == "cpp"
    for op in ("dct_crop", "idct_pad", "gaussian_sample_kl", "gaussian_sample_kl_grouped", "dml_log_prob",
               "dml_sample", "conv1x1"):
        assert "cpp" in _backend._REGISTRY[op], op


# ---------------------------------------------------------------------------- build machinery
@pytest.mark.parametrize("missing", ["compiler", "ninja", "writable cache"])
def test_missing_toolchain_warns_once_and_raises(cpp, monkeypatch, tmp_path, missing):
    import torch.utils.cpp_extension as ext

    from dvp_fast.ops import cpp_build

    monkeypatch.setenv("DVP_FAST_CACHE", str(tmp_path))  # nothing built there yet
    if missing == "compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
        reason = "no C++ compiler found"
    elif missing == "ninja":
        monkeypatch.setattr(ext, "is_ninja_available", lambda: False)
        reason = "ninja is not installed"
    else:
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("DVP_FAST_CACHE", str(tmp_path / "a-file"))  # the cache cannot be created
        reason = "building the C++ kernels in"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImportError, match=re.escape(reason)):
            cpp_build.build_and_load()
    assert len(caught) == 1 and reason in str(caught[0].message), [str(w.message) for w in caught]


def test_compile_error_shows_the_compiler_message(cpp, monkeypatch, tmp_path):
    from dvp_fast.ops import cpp_build

    src = tmp_path / "src"
    src.mkdir()
    (src / "dct.cpp").write_text('#error "deliberately broken kernel source"\n')
    monkeypatch.setenv("DVP_FAST_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImportError, match="deliberately broken kernel source"):
            cpp_build.build_and_load(src, name="dvp_fast_broken_probe")
    assert len(caught) == 1 and "deliberately broken" in str(caught[0].message)


def test_build_key_depends_on_contents_not_on_install_paths(cpp, monkeypatch, tmp_path):
    """A checkout and an installed copy (same sources, other paths, torch elsewhere) share one
    build directory; another source, torch version or instruction set gets its own."""
    import shutil

    from dvp_fast.ops import cpp_build

    copies = [tmp_path / "checkout" / "csrc", tmp_path / "venv" / "site-packages" / "dvp_fast" / "csrc"]
    for copy in copies:
        shutil.copytree(cpp_build.source_dir(), copy)
    key = lambda src: cpp_build.build_settings(src, tmp_path / "cache")[3]  # noqa: E731
    reference = key(copies[0])
    assert key(copies[1]) == reference
    with monkeypatch.context() as m:  # the same torch installed in another environment
        m.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
        assert key(copies[1]) == reference
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", torch.__version__ + ".post1")
        assert key(copies[0]) != reference
    other_isa = "avx2" if cpp_build._isa_flags()[0] == "base" else "base"
    with monkeypatch.context() as m:
        m.setattr(cpp_build, "_isa_flags", lambda: (other_isa, []))
        assert key(copies[0]) != reference
    (copies[1] / "dct.cpp").write_text((copies[1] / "dct.cpp").read_text() + "// changed\n")
    assert key(copies[1]) != reference


def _python(code: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_without_compiler_auto_falls_back_and_cpp_raises(tmp_path):
    """A fresh process with no compiler and an empty cache: one warning, torch results, clear error."""
    result = _python("""
        import warnings
        warnings.simplefilter("always")
        import torch
        from dvp_fast import ops
        x = torch.zeros(1, 3, 4, 4); params = torch.zeros(1, 100, 4, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lp = ops.dml_log_prob(x, params, backend="auto")
            lp2 = ops.dml_log_prob(x, params, backend="auto")
        assert torch.equal(lp, ops.dml_log_prob(x, params, backend="torch"))
        messages = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
        assert len(messages) == 1, messages
        try:
            ops.dml_log_prob(x, params, backend="cpp")
        except RuntimeError as exc:
            print("ERROR:", exc)
        else:
            raise AssertionError("backend='cpp' must raise")
    """, {"CXX": str(tmp_path / "missing-compiler"), "DVP_FAST_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR: dml_log_prob: backend='cpp' is not available" in result.stdout
    assert "no C++ compiler found" in result.stdout


PROBE_SOURCE = """
    // A small library (about a second to compile, so the two builders overlap).
    #include <algorithm>
    #include <numeric>
    #include <string>
    #include <vector>
    extern "C" int dvp_probe() {
      std::vector<std::string> words = {"dvp", "fast", "probe"};
      std::sort(words.begin(), words.end());
      return std::accumulate(words.begin(), words.end(), 0, [](int n, const std::string& w) { return n + 3 * int(w.size()); }) + 6;
    }
"""


@pytest.mark.slow
def test_concurrent_first_builds_share_the_cache(cpp, tmp_path):
    """Two processes build the same library into one empty cache at the same moment; both load a
    working library, and a third process loads it without building. (The processes import the
    backend from the already built default cache; only the probe library is built here.)"""
    src = tmp_path / "src"
    src.mkdir()
    (src / "dct.cpp").write_text(textwrap.dedent(PROBE_SOURCE))
    cache = tmp_path / "cache"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    code = f"""
        import ctypes, os, sys, time
        from pathlib import Path
        from dvp_fast.ops.cpp_build import build_and_load
        barrier, peers = Path({str(barrier)!r}), int(sys.argv[1])
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < peers:  # start building together
            time.sleep(0.01)
        path = build_and_load(Path({str(src)!r}), name="dvp_fast_probe", cache=Path({str(cache)!r}))
        print("RESULT", ctypes.CDLL(str(path)).dvp_probe())
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and "RESULT 42" in out, out + err
        assert err.count("building the native CPU kernels") == 1, err
    third = subprocess.run([sys.executable, "-c", textwrap.dedent(code), "1"], capture_output=True, text=True,
                           timeout=240)
    assert third.returncode == 0 and "RESULT 42" in third.stdout, third.stdout + third.stderr
    assert "building" not in third.stderr, "a finished build must be reused"
    built = list(cache.rglob("dvp_fast_probe.so"))
    assert len(built) == 1 and (built[0].parent / "built").exists()


# --- C++17: torch's extension builder compiles with -std=c++17 up to torch 2.11 at least, with -std=c++20 in 2.13+ ---
CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")
# C++20-only language and library features; on a torch that builds with -std=c++20 they compile, so
# only this scan (or a build with an older torch) shows that the sources no longer build there.
CXX20_ONLY = [r"\bstd::(bit_cast|span|ranges|views|numbers|popcount|countl_zero|countr_zero|bit_width|has_single_bit|"
              r"bit_ceil|bit_floor|ssize|lerp|midpoint|to_array|format|source_location|strong_ordering|"
              r"weak_ordering|partial_ordering)\b",
              r"#\s*include\s*<(bit|span|numbers|concepts|ranges|compare|format|version|source_location)>",
              r"operator\s*<=>", r"\b(consteval|constinit|co_await|co_yield|co_return|char8_t)\b",
              r"\[\[\s*(likely|unlikely|no_unique_address)\s*\]\]", r"\brequires\s*[({]", r"\bconcept\s+\w+\s*="]


def _code_of(path: str) -> str:
    """The source with comments and string literals blanked (so that prose mentioning a feature does not count)."""
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(\\.|[^"\\\n])*"', '""', text)


def test_sources_use_no_cxx20_only_features():
    sources = sorted(name for name in os.listdir(CSRC) if name.endswith((".h", ".cpp")))
    assert "common.h" in sources
    found = []
    for name in sources:
        for lineno, line in enumerate(_code_of(os.path.join(CSRC, name)).splitlines(), 1):
            found += [f"{name}:{lineno}: {line.strip()}" for pattern in CXX20_ONLY if re.search(pattern, line)]
    assert not found, "C++20-only features (torch 2.11 builds extensions with -std=c++17):\n" + "\n".join(found)


def test_build_flags_leave_the_language_standard_to_torch(cpp, tmp_path):
    """torch's extension builder passes its own -std (c++17 in 2.11, c++20 in 2.13+); a second one
    of ours would override it and break either the older or the newer torch's headers."""
    from dvp_fast.ops import cpp_build

    _, cflags, ldflags, _ = cpp_build.build_settings(cpp_build.source_dir(), tmp_path)
    assert not [f for f in cflags + ldflags if f.startswith(("-std=", "/std:"))]


def test_sources_compile_as_cxx17(tmp_path):
    """Each source passes the compiler's syntax check with -std=c++17, where the installed torch's own
    headers allow that (torch 2.11 and older; 2.13+'s headers need C++20, and then this is skipped)."""
    import shutil
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    command = [compiler, "-std=c++17", "-fsyntax-only", "-fopenmp", *includes]
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <ATen/core/Tensor.h>\n")
    if subprocess.run([*command, str(probe)], capture_output=True).returncode != 0:
        pytest.skip(f"torch {torch.__version__}'s headers do not compile as C++17 (its extensions build as C++20)")
    for name in sorted(n for n in os.listdir(CSRC) if n.endswith(".cpp")):
        result = subprocess.run([*command, os.path.join(CSRC, name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name} is not C++17:\n{result.stderr[-4000:]}"
