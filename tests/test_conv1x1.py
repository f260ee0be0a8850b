"""conv1x1 (a 1x1 convolution of x or of SiLU(x)) on every backend, against the fallback and a float64 oracle.

The oracle is the sum y[b, o] = sum_i W[o, i] act(x[b, i]) + bias[o] written as a float64 einsum,
with act(v) = v / (1 + e^-v); its gradients come from float64 autograd, independent of any
backend's hand-written backward. Shapes cover one sample, one channel, a tail chunk (batches
that do not divide into the cpp kernel's chunks), images wider than a chunk, and no bias.
"""
import pytest
import torch
import torch.nn.functional as F

from dvp_fast import ops
from dvp_fast.ops import _backend
from helpers import as_float64, assert_close, backends_implementing, device_for
from oracles import conv1x1_oracle

pytestmark = pytest.mark.usefixtures("nan_filled_allocations")


@pytest.fixture(params=backends_implementing("conv1x1"))
def backend(request):
    """conftest's `backend`, over the backends with a conv1x1 kernel only (Triton has none: cuDNN's job)."""
    if not ops.backend_available(request.param):
        pytest.skip(f"backend {request.param!r} is not available here")
    return request.param

# Largest error relative to the largest expected magnitude, per input dtype.
TOL = {torch.float32: 3e-5, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
# (B, Cin, Cout, H, W): the cpp kernel takes 2048 // (H W) samples per chunk.
SHAPES = [(1, 1, 1, 1, 1), (3, 5, 7, 5, 3), (7, 4, 6, 40, 16), (5, 32, 2, 7, 7), (2, 3, 4, 48, 48)]


def inputs(shape, dtype, bias=True, seed=0):
    b, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, cin, h, w, generator=gen) * 3).to(dtype)  # SiLU's both regimes
    weight = (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(dtype)
    b_ = torch.randn(cout, generator=gen).to(dtype) if bias else None
    return x, weight, b_


def forward_backward(backend, x, weight, bias, silu, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    y = ops.conv1x1(leaves[0], leaves[1], leaves[2] if bias is not None else None, silu=silu, backend=backend)
    return y, torch.autograd.grad(y, leaves, g.to(y.dtype))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv1x1_matches_the_oracle_and_the_fallback(backend, shape, dtype, silu, bias):
    device = device_for(backend)
    x, weight, b = (None if t is None else t.to(device) for t in inputs(shape, dtype, bias))
    g = torch.randn(shape[0], shape[2], shape[3], shape[4]).to(device)
    y, grads = forward_backward(backend, x, weight, b, silu, g)
    assert y.dtype == dtype and y.shape == g.shape
    y64, leaves64 = conv1x1_oracle(x, weight, b, silu)
    grads64 = torch.autograd.grad(y64, leaves64, torch.from_numpy(as_float64(g.to(dtype))))
    tol = TOL[dtype]
    assert_close(y, y64, tol, "y")
    for name, got, want, leaf in zip(("d x", "d weight", "d bias"), grads, grads64, (x, weight, b)):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        assert_close(got, want, tol, name)
    if backend != "torch":
        y_fb, grads_fb = forward_backward("torch", x, weight, b, silu, g)
        assert_close(y, y_fb, 2 * tol, "y vs fallback")
        for name, got, want in zip(("d x", "d weight", "d bias"), grads, grads_fb):
            assert_close(got, want, 2 * tol, f"{name} vs fallback")


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=["x_only", "weights_only", "bias_only"])
def test_only_the_gradients_asked_for(backend, needs):
    x, weight, b = (t.to(device_for(backend)) for t in inputs((3, 4, 5, 6, 6), torch.float32))
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, weight, b), needs)]
    y = ops.conv1x1(*leaves, silu=True, backend=backend)
    y64, leaves64 = conv1x1_oracle(x, weight, b, True)
    g = torch.randn_like(y)
    wanted = [t for t, need in zip(leaves, needs) if need]
    got = torch.autograd.grad(y, wanted, g)
    expected = torch.autograd.grad(y64, [l for l, need in zip(leaves64, needs) if need], g.double())
    for a, e in zip(got, expected):
        assert_close(a, e, TOL[torch.float32], "grad")


def test_no_grad_path_matches(backend):
    x, weight, b = (t.to(device_for(backend)) for t in inputs((4, 6, 3, 9, 9), torch.float32))
    with torch.no_grad():
        y = ops.conv1x1(x, weight, b, silu=True, backend=backend)
    assert_close(y, conv1x1_oracle(x, weight, b, True)[0], TOL[torch.float32], "y")


def test_autocast_casts_like_conv2d(backend):
    """Under CPU autocast (bfloat16) the op returns what F.conv2d returns: the bfloat16 convolution of the
    bfloat16-rounded inputs, with float32 gradients for float32 weights."""
    if device_for(backend) != "cpu":
        pytest.skip("CPU autocast")
    x, weight, b = inputs((2, 8, 4, 5, 5), torch.float32)
    weight = weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.conv1x1(x, weight, b, silu=True, backend=backend)
        y_ref = F.conv2d(F.silu(x), weight, b)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y, y_ref, 2 * TOL[torch.bfloat16], "y")
    (gw,) = torch.autograd.grad(y.float().sum(), weight)
    assert gw.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 3, 4)), r"x must have shape \(B, Cin, H, W\)"),
    (dict(x=torch.randn(2, 3, 0, 4)), r"x must have H, W >= 1, got shape \(2, 3, 0, 4\)"),
    (dict(weight=torch.randn(5, 3, 3, 3)), r"weight must have shape \(Cout, 3, 1, 1\)"),
    (dict(weight=torch.randn(5, 4, 1, 1)), r"weight must have shape \(Cout, 3, 1, 1\)"),
    (dict(bias=torch.randn(4)), r"bias must have shape \(5,\)"),
    (dict(x=torch.ones(2, 3, 4, 4, dtype=torch.int64)), "x must be a floating-point tensor"),
    (dict(x=torch.randn(2, 3, 4, 4, dtype=torch.float64)), "must share one dtype"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(x=torch.randn(2, 3, 4, 4), weight=torch.randn(5, 3, 1, 1), bias=torch.randn(5))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.conv1x1(args["x"], args["weight"], args["bias"])


def test_triton_override_keeps_the_fallback_for_ops_it_has_no_kernel_for():
    """use_backend("triton") moves every op Triton implements; conv1x1 (cuDNN's job on a GPU) stays on torch."""
    if not ops.backend_available("triton"):
        pytest.skip("triton is not available here")
    with ops.use_backend("triton"):
        assert _backend.choose_backend("conv1x1", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="no implementation of this op"):
        _backend.choose_backend("conv1x1", "triton", torch.device("cpu"))


def test_an_empty_batch_gives_empty_outputs_and_zero_weight_gradients(backend):
    x, weight, b = (t.to(device_for(backend)).requires_grad_() for t in inputs((1, 3, 5, 4, 4), torch.float32))
    x_empty = x.detach()[:0].requires_grad_()
    y = ops.conv1x1(x_empty, weight, b, silu=True, backend=backend)
    assert y.shape == (0, 5, 4, 4)
    gx, gw, gb = torch.autograd.grad(y.sum(), [x_empty, weight, b])
    assert gx.shape == x_empty.shape and not gw.any() and not gb.any()
