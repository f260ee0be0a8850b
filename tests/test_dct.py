"""dct_crop and idct_pad on every backend, against the fallback and a float64 scipy oracle.

The oracle is `scipy.fft.dctn(type=2, norm="ortho")` on the full D x D image,
then a crop (and `idctn` of the zero-padded block for the inverse): the textbook
route the fast ops avoid. Its gradients are written from the chain rule and are
themselves checked against float64 finite differences.
"""
import numpy as np
import pytest
import torch

from dvp_fast import ops
from dvp_fast.ops.dct import dct_scale_bound
from helpers import as_float64, device_for
from oracles import (dct2, dct_crop_grads_oracle, dct_crop_oracle, idct_pad_grads_oracle,
                     idct_pad_oracle)

pytestmark = pytest.mark.usefixtures("nan_filled_allocations")

# Largest error relative to the largest magnitude of the expected tensor, per input dtype.
# fp32 bounds fp32 arithmetic; bf16/fp16 bound rounding of the output to that dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
TOL[torch.float64] = TOL[torch.float32]  # accepted and returned as float64; the math is fp32 on every backend
DTYPES = list(TOL)
# (B, C, D, d): batch 1, MNIST (28, 7) and CIFAR (32, 5) sides, and a non-power-of-two pair.
SHAPES = [(1, 1, 28, 7), (2, 3, 32, 5), (3, 2, 28, 5), (1, 3, 32, 7), (2, 1, 20, 13)]













def assert_close(actual: torch.Tensor, expected, tol: float, what: str) -> None:
    actual64, expected = as_float64(actual), as_float64(expected)
    assert np.isfinite(actual64).all(), f"{what}: non-finite elements (an output element was never written?)"
    err = np.abs(actual64 - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert err <= tol, f"{what}: max error {err:.3g} relative to max |expected|, tolerance {tol:.3g}"


# --- inputs -----------------------------------------------------------------------------------------
def random_images(b, c, size, dtype, device):
    """8-bit levels in [-1, 1] with the extreme levels 0 and 255 always present."""
    levels = torch.randint(0, 256, (b, c, size, size))
    levels[..., 0, 0] = 0
    levels[..., -1, -1] = 255
    return (levels.double() / 127.5 - 1.0).to(dtype=dtype, device=device)


def fitted_scale(x, d):
    """Like the model's S (max |coefficient|) but 0.6x smaller, so a share of coefficients clamps."""
    coeffs = np.abs(dct2((x.double().cpu().numpy() + 1.0) / 2.0)[..., :d, :d]).max(0)
    return torch.tensor(0.6 * coeffs + 1e-3, dtype=torch.float32)


def random_pseudo_inputs(b, c, d, dtype, device):
    return (torch.rand(b, c, d, d, dtype=torch.float64) * 2.0 - 1.0).to(dtype=dtype, device=device)


# --- the oracle is right -----------------------------------------------------------------------------
def _directional_check(f, grad, x, seed=0):
    """<grad, v> equals the central finite difference of f along a random v (float64)."""
    v = np.random.default_rng(seed).standard_normal(x.shape)
    h = 1e-6
    numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
    analytic = (grad * v).sum()
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def test_oracle_gradients_match_finite_differences():
    x = random_images(2, 3, 28, torch.float64, "cpu").numpy()
    scale = fitted_scale(torch.from_numpy(x), 7).double().numpy()
    raw = dct_crop_oracle(x, scale)[1]
    assert 0 < ((raw < -1) | (raw > 1)).mean() < 1, "the clamp should be partly active"
    dy = np.random.default_rng(1).standard_normal(raw.shape)
    dx, dscale = dct_crop_grads_oracle(raw, scale, dy, 28)
    _directional_check(lambda t: (dy * dct_crop_oracle(t, scale)[0]).sum(), dx, x)
    _directional_check(lambda s: (dy * dct_crop_oracle(x, s)[0]).sum(), dscale, scale)

    u = np.random.default_rng(2).uniform(-1, 1, (2, 3, 7, 7))
    scale = dct_scale_bound(3, 7, 28).double().numpy()
    image01 = idct_pad_oracle(u, scale, 28)[1]
    assert 0 < ((image01 < 0) | (image01 > 1)).mean() < 1, "the clamp should be partly active"
    dout = np.random.default_rng(3).standard_normal(image01.shape)
    du, dscale = idct_pad_grads_oracle(u, scale, image01, dout)
    _directional_check(lambda t: (dout * idct_pad_oracle(t, scale, 28)[0]).sum(), du, u)
    _directional_check(lambda s: (dout * idct_pad_oracle(u, s, 28)[0]).sum(), dscale, scale)


def test_oracle_matches_the_cropped_basis_identity():
    """dct_basis rows are the DCT-II the oracle uses: A_d X A_d^T equals the crop of dctn."""
    x = np.random.default_rng(4).standard_normal((3, 20, 20))
    basis = ops.dct_basis(13, 20, dtype=torch.float64).numpy()
    np.testing.assert_allclose(basis @ x @ basis.T, dct2(x)[..., :13, :13], atol=1e-12)


# --- the ops -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}D{}d{}".format(*s))
def test_dct_crop_forward_backward(backend, shape, dtype):
    b, c, size, d = shape
    dev = device_for(backend)
    x = random_images(b, c, size, dtype, dev).requires_grad_()
    scale = fitted_scale(x.detach(), d).to(dev)
    y = ops.dct_crop(x, scale, backend=backend)
    dy = torch.randn(y.shape, dtype=dtype, device=dev)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.dtype == dtype and y.shape == (b, c, d, d) and dx.dtype == dtype

    x64, scale64 = x.detach().double().cpu().numpy(), scale.double().cpu().numpy()
    y_ref, raw = dct_crop_oracle(x64, scale64)
    dx_ref = dct_crop_grads_oracle(raw, scale64, dy.double().cpu().numpy(), size)[0]
    # y is compared in coefficient units (times S): a small S divides fp32 rounding of the DCT too.
    assert_close(as_float64(y) * scale64, y_ref * scale64, TOL[dtype], "y vs float64 oracle")
    assert_close(dx, dx_ref, TOL[dtype], "dx vs float64 oracle")

    x_fb = x.detach().clone().requires_grad_()
    y_fb = ops.dct_crop(x_fb, scale, backend="torch")
    (dx_fb,) = torch.autograd.grad(y_fb, x_fb, dy)
    assert_close(as_float64(y) * scale64, as_float64(y_fb) * scale64, TOL[dtype], "y vs fallback")
    assert_close(dx, dx_fb, TOL[dtype], "dx vs fallback")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}D{}d{}".format(*s))
def test_idct_pad_forward_backward(backend, shape, dtype):
    b, c, size, d = shape
    dev = device_for(backend)
    u = random_pseudo_inputs(b, c, d, dtype, dev).requires_grad_()
    scale = dct_scale_bound(c, d, size).to(dev)
    image = ops.idct_pad(u, scale, size, backend=backend)
    dout = torch.randn(image.shape, dtype=dtype, device=dev)
    (du,) = torch.autograd.grad(image, u, dout)
    assert image.dtype == dtype and image.shape == (b, c, size, size) and du.dtype == dtype

    u64, scale64 = u.detach().double().cpu().numpy(), scale.double().cpu().numpy()
    image_ref, image01 = idct_pad_oracle(u64, scale64, size)
    assert ((image01 < 0) | (image01 > 1)).any(), "the clamp should be active somewhere"
    du_ref = idct_pad_grads_oracle(u64, scale64, image01, dout.double().cpu().numpy())[0]
    assert_close(image, image_ref, TOL[dtype], "image vs float64 oracle")
    assert_close(du, du_ref, TOL[dtype], "du vs float64 oracle")

    u_fb = u.detach().clone().requires_grad_()
    image_fb = ops.idct_pad(u_fb, scale, size, backend="torch")
    (du_fb,) = torch.autograd.grad(image_fb, u_fb, dout)
    assert_close(image, image_fb, TOL[dtype], "image vs fallback")
    assert_close(du, du_fb, TOL[dtype], "du vs fallback")


def test_scale_gradients(backend):
    """S is a buffer in the model, but the ops are differentiable in it like the fallback."""
    b, c, size, d = 2, 3, 28, 7
    dev = device_for(backend)
    x = random_images(b, c, size, torch.float32, dev)
    scale = fitted_scale(x, d).to(dev).requires_grad_()
    y = ops.dct_crop(x, scale, backend=backend)
    dy = torch.randn_like(y)
    (dscale,) = torch.autograd.grad(y, scale, dy)
    x64, scale64 = x.double().cpu().numpy(), scale.detach().double().cpu().numpy()
    raw = dct_crop_oracle(x64, scale64)[1]
    expected = dct_crop_grads_oracle(raw, scale64, dy.double().cpu().numpy(), size)[1]
    # dS = -dy raw / S^2: compared times S^2, i.e. in coefficient units, like y above.
    assert_close(as_float64(dscale) * scale64 ** 2, expected * scale64 ** 2, 1e-5, "dct_crop dS")

    u = random_pseudo_inputs(b, c, d, torch.float32, dev)
    scale = dct_scale_bound(c, d, size).to(dev).requires_grad_()
    image = ops.idct_pad(u, scale, size, backend=backend)
    dout = torch.randn_like(image)
    (dscale,) = torch.autograd.grad(image, scale, dout)
    u64, scale64 = u.double().cpu().numpy(), scale.detach().double().cpu().numpy()
    image01 = idct_pad_oracle(u64, scale64, size)[1]
    expected = idct_pad_grads_oracle(u64, scale64, image01, dout.double().cpu().numpy())[1]
    assert_close(dscale, expected, 1e-5, "idct_pad dS")


def test_constant_images_hit_the_ends_of_the_range(backend):
    """All-black images give y = 0 (DC of zeros); all-white give a DC of D / S and zero AC terms."""
    dev = device_for(backend)
    size, d = 28, 7
    x = torch.cat([torch.full((1, 1, size, size), -1.0), torch.full((1, 1, size, size), 1.0)]).to(dev)
    scale = torch.full((1, d, d), 2.0 * size, device=dev)
    y = ops.dct_crop(x, scale, backend=backend).cpu()
    expected = torch.zeros(2, 1, d, d)
    expected[1, 0, 0, 0] = 0.5  # DC of ones is D, over S = 2 D
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
