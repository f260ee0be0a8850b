"""The "triton" backend: autograd wrappers around the fused kernels of `dvp_fast.kernels`.

Each op has two layers:
  * a custom op `dvp_fast::<name>` whose body only allocates outputs and launches
    kernels. On a GPU it is a `torch.library.triton_op` launching through
    `wrap_triton`, so torch.compile traces into the launches without graph breaks;
    under TRITON_INTERPRET=1 (CPU tensors, no GPU) wrap_triton cannot trace the
    interpreter's functions, so the same body is registered as an opaque
    `custom_op` with a shape-only fake instead. `register_autograd` attaches the
    backward (itself a custom op) in both cases.
  * a plain function registered with `register(op, "triton")` that prepares the
    arguments every launch needs (contiguous inputs, the cached DCT basis, a
    Philox seed drawn on the device from torch's RNG, the grouped offsets) and
    that torch.compile traces as ordinary PyTorch.
Nothing here reads a tensor value on the host, so no op synchronises.
"""
import contextlib
from typing import Callable, Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from dvp_fast.kernels import dct as dct_kernels
from dvp_fast.kernels import dml as dml_kernels
from dvp_fast.kernels import gaussian_kl as kl_kernels

from ._backend import register, triton_interpreting
from .dct import dct_basis, dct_coefficients

_INTERPRET = triton_interpreting()


def _define(name: str, fake: Callable) -> Callable[[Callable], object]:
    """Register `fn` as the custom op dvp_fast::name (see the module docstring for the two cases)."""

    def wrap(fn: Callable):
        qualname = f"dvp_fast::{name}"
        if _INTERPRET:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
            op.register_fake(fake)
            return op
        return triton_op(qualname, fn, mutates_args=())

    return wrap


def _device_guard(device: torch.device):
    """torch.cuda.device(device) for a CUDA device; nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Launcher:
    """`kernel[grid](*args, **meta)` launched on the device of the first tensor argument.

    Triton launches on the *current* CUDA device (and its current stream), not on the device of
    the tensors it is given, so a model on cuda:1 would launch its kernels on cuda:0; the guard
    makes the tensors' device current for the launch (a cheap device exchange, undone after).
    """

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def guarded(*args, **meta):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            with _device_guard(device):
                return launch(*args, **meta)

        return guarded


def _launch(kernel):
    return _Launcher(kernel if _INTERPRET else wrap_triton(kernel))


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox key from torch's RNG, drawn on the device (no sync); manual_seed makes it reproducible."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def _placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A pointer for a kernel argument that a constexpr flag guarantees is never read."""
    return torch.empty(1, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# DCT pseudo-inputs
# --------------------------------------------------------------------------------------------------
def _dct_grid_and_blocks(planes: int, d: int, size: int) -> tuple[tuple[int], dict]:
    block_small, block_large = dct_kernels.block_sizes(d, size)
    return (planes,), dict(BLOCK_d=block_small, BLOCK_D=block_large, num_warps=dct_kernels.NUM_WARPS)


def _dct_crop_empty(x, scale, basis):
    return x.new_empty(x.shape[0], x.shape[1], scale.shape[-1], scale.shape[-1])


@_define("dct_crop", _dct_crop_empty)
def _dct_crop_op(x: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    y = _dct_crop_empty(x, scale, basis)
    b, c, size, _ = x.shape
    d = scale.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    _launch(dct_kernels.dct_crop_fwd_kernel)[grid](x, basis, scale, y, c, d, size, **meta)
    return y


@_define("dct_crop_backward", lambda x, scale, basis, dy: torch.empty_like(x))
def _dct_crop_backward_op(x: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor,
                          dy: torch.Tensor) -> torch.Tensor:
    dx = torch.empty_like(x)
    b, c, size, _ = x.shape
    d = scale.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    _launch(dct_kernels.dct_crop_bwd_kernel)[grid](x, basis, scale, dy, dx, c, d, size, **meta)
    return dx


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dct_crop_backward(ctx, dy):
    x, scale, basis = ctx.saved_tensors
    dy = dy.float().contiguous()
    dx = _dct_crop_backward_op(x, scale, basis, dy) if ctx.needs_input_grad[0] else None
    dscale = _dct_crop_scale_grad(x, scale, basis, dy) if ctx.needs_input_grad[1] else None
    return dx, dscale, None


def _dct_crop_scale_grad(x, scale, basis, dy):
    """d/dS of clamp(raw / S): -dy raw / S^2 where the clamp passes, summed over the batch.

    S is a fixed normaliser in the model (a buffer), so this rare path uses plain matmuls.
    """
    raw = dct_coefficients(x, scale.shape[-1])
    ratio = raw / scale
    passes = (ratio >= -1.0) & (ratio <= 1.0)
    return torch.where(passes, -dy.float() * ratio / scale, 0.0).sum(0)


torch.library.register_autograd("dvp_fast::dct_crop", _dct_crop_backward, setup_context=_save_inputs)


@register("dct_crop", "triton")
def dct_crop_triton(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    basis = dct_basis(scale.shape[-1], x.shape[-1], device=x.device)
    # The kernels are fp32-only (one compiled variant per tile); these tensors are tiny.
    return _dct_crop_op(x.float().contiguous(), scale.float().contiguous(), basis).to(x.dtype)


def _idct_pad_empty(u, scale, basis):
    return u.new_empty(u.shape[0], u.shape[1], basis.shape[-1], basis.shape[-1])


@_define("idct_pad", _idct_pad_empty)
def _idct_pad_op(u: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    out = _idct_pad_empty(u, scale, basis)
    b, c, d, _ = u.shape
    size = basis.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    _launch(dct_kernels.idct_pad_fwd_kernel)[grid](u, scale, basis, out, c, d, size, **meta)
    return out


@_define("idct_pad_backward", lambda u, scale, basis, dout: torch.empty_like(u))
def _idct_pad_backward_op(u: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor,
                          dout: torch.Tensor) -> torch.Tensor:
    du = torch.empty_like(u)
    b, c, d, _ = u.shape
    size = basis.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    _launch(dct_kernels.idct_pad_bwd_kernel)[grid](u, scale, basis, dout, du, c, d, size, **meta)
    return du


def _idct_pad_backward(ctx, dout):
    u, scale, basis = ctx.saved_tensors
    dout = dout.float().contiguous()
    du = _idct_pad_backward_op(u, scale, basis, dout) if ctx.needs_input_grad[0] else None
    dscale = _idct_pad_scale_grad(u, scale, basis, dout) if ctx.needs_input_grad[1] else None
    return du, dscale, None


def _idct_pad_scale_grad(u, scale, basis, dout):
    """d/dS of 2 clamp(A^T (u S) A, 0, 1) - 1: u * A (2 dout * mask) A^T, summed over the batch (rare path)."""
    image01 = basis.T @ (u.float() * scale) @ basis
    passes = (image01 >= 0.0) & (image01 <= 1.0)
    dv = basis @ torch.where(passes, 2.0 * dout.float(), 0.0) @ basis.T
    return (dv * u.float()).sum(0)


torch.library.register_autograd("dvp_fast::idct_pad", _idct_pad_backward, setup_context=_save_inputs)


@register("idct_pad", "triton")
def idct_pad_triton(u: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    basis = dct_basis(u.shape[-1], size, device=u.device)
    return _idct_pad_op(u.float().contiguous(), scale.float().contiguous(), basis).to(u.dtype)


# --------------------------------------------------------------------------------------------------
# Gaussian sample + KL
# --------------------------------------------------------------------------------------------------
def _kl_shape(mu_q, offsets) -> tuple[int, ...]:
    """kl is (B,) for one layer, (B, L) for L grouped layers; the backward kernel reads dkl with the same layout."""
    batch = mu_q.shape[0]
    return (batch,) if offsets is None else (batch, offsets.shape[0] - 1)


def _kl_empty(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets):
    return torch.empty_like(mu_q), mu_q.new_empty(_kl_shape(mu_q, offsets), dtype=torch.float32)


def _kl_launch_args(mu_q, noise, seed, offsets):
    """(grid, the noise/seed/offsets pointers, num_segments, constexprs) shared by forward and backward."""
    batch, row_len = mu_q.shape
    dev = mu_q.device
    grouped = offsets is not None
    num_segments = offsets.shape[0] - 1 if grouped else 1
    block = kl_kernels.block_size(row_len // num_segments)  # the tuning hook: mean segment width
    meta = dict(HAS_NOISE=noise is not None, GROUPED=grouped, BLOCK=block, num_warps=kl_kernels.NUM_WARPS)
    pointers = (mu_q if noise is None else noise,
                _placeholder(torch.int64, dev) if seed is None else seed,
                offsets if grouped else _placeholder(torch.int32, dev))
    return (batch, num_segments), pointers, num_segments, meta


@_define("gaussian_sample_kl", _kl_empty)
def _sample_kl_op(mu_q: torch.Tensor, lv_q: torch.Tensor, mu_p: torch.Tensor, lv_p: torch.Tensor,
                  noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                  offsets: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, N); noise (B, N) or None (then seed (1,) int64); offsets (L + 1,) int32 or None."""
    z, kl = _kl_empty(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets)
    grid, pointers, num_segments, meta = _kl_launch_args(mu_q, noise, seed, offsets)
    _launch(kl_kernels.sample_kl_fwd_kernel)[grid](mu_q, lv_q, mu_p, lv_p, *pointers, z, kl,
                                                     mu_q.shape[1], num_segments, **meta)
    return z, kl


def _kl_backward_empty(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets, dz, dkl):
    return tuple(torch.empty_like(t) for t in (mu_q, lv_q, mu_p, lv_p))


@_define("gaussian_sample_kl_backward", _kl_backward_empty)
def _sample_kl_backward_op(mu_q: torch.Tensor, lv_q: torch.Tensor, mu_p: torch.Tensor, lv_p: torch.Tensor,
                           noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                           offsets: Optional[torch.Tensor], dz: torch.Tensor, dkl: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if tuple(dkl.shape) != _kl_shape(mu_q, offsets) or dz.shape != mu_q.shape:
        raise ValueError(f"gaussian_sample_kl_backward: dz {tuple(dz.shape)} / dkl {tuple(dkl.shape)} do not match "
                         f"z {tuple(mu_q.shape)} / kl {_kl_shape(mu_q, offsets)}")  # the kernel would read out of bounds
    grads = _kl_backward_empty(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets, dz, dkl)
    grid, pointers, num_segments, meta = _kl_launch_args(mu_q, noise, seed, offsets)
    _launch(kl_kernels.sample_kl_bwd_kernel)[grid](mu_q, lv_q, mu_p, lv_p, *pointers, dz, dkl, *grads,
                                                     mu_q.shape[1], num_segments, **meta)
    return grads


def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)  # an unused z or kl then costs no zero-filled gradient


def _kl_backward(ctx, dz, dkl):
    mu_q, lv_q, mu_p, lv_p, noise, seed, offsets = ctx.saved_tensors
    # An output that took no part in the loss arrives as None.
    dz = torch.zeros_like(mu_q) if dz is None else dz.contiguous()
    # The zeros take kl's own shape: (B, L) when grouped, since the kernel indexes dkl[row, segment].
    dkl = mu_q.new_zeros(_kl_shape(mu_q, offsets), dtype=torch.float32) if dkl is None else dkl.float().contiguous()
    grads = _sample_kl_backward_op(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets, dz, dkl)
    dnoise = None
    if noise is not None and ctx.needs_input_grad[4]:
        dnoise = dz * torch.exp(0.5 * lv_q.float())  # rare: noise is normally data, not a parameter
    return (*grads, dnoise, None, None)


torch.library.register_autograd("dvp_fast::gaussian_sample_kl", _kl_backward, setup_context=_kl_setup)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The inputs' common dtype if the kernels are compiled for it, else fp32 (float64: math is fp32 anyway)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in _KERNEL_DTYPES else torch.float32


@register("gaussian_sample_kl", "triton")
def gaussian_sample_kl_triton(mu_q, logvar_q, mu_p, logvar_p, noise=None):
    inputs = [mu_q, logvar_q, mu_p, logvar_p] + ([] if noise is None else [noise])
    dtype = _kernel_dtype(*inputs)
    batch = mu_q.shape[0]
    flat = [t.to(dtype).reshape(batch, -1).contiguous() for t in inputs]
    seed = _draw_seed(mu_q.device) if noise is None else None
    z, kl = _sample_kl_op(*flat[:4], flat[4] if noise is not None else None, seed, None)
    return z.view(mu_q.shape).to(mu_q.dtype), kl


_OFFSETS_CACHE: dict[tuple, torch.Tensor] = {}


def _segment_offsets(widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Column offsets (L + 1,) of the layers in the concatenated rows, cached per layout.

    The layout is fixed by the model, so the host-to-device copy happens once
    (non-blocking), not on every forward.
    """
    key = (widths, device)
    offsets = _OFFSETS_CACHE.get(key)
    if offsets is None:
        starts = [0]
        for w in widths:
            starts.append(starts[-1] + w)
        offsets = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)
        _OFFSETS_CACHE[key] = offsets
    return offsets


@register("gaussian_sample_kl_grouped", "triton")
def gaussian_sample_kl_grouped_triton(layers):
    """All layers in one launch: rows are concatenated per input, each layer a segment of columns."""
    batch = layers[0][0].shape[0]
    if any(layer[0].shape[0] != batch for layer in layers):
        raise ValueError("gaussian_sample_kl_grouped: every layer must have the same batch size")
    dtype = _kernel_dtype(*(t for layer in layers for t in layer))
    widths = tuple(layer[0].numel() // batch for layer in layers)
    cat = [torch.cat([layer[i].to(dtype).reshape(batch, -1) for layer in layers], dim=1) for i in range(4)]
    offsets = _segment_offsets(widths, layers[0][0].device)
    z, kl = _sample_kl_op(*cat, None, _draw_seed(cat[0].device), offsets)
    # split (not slicing) so that backward gathers the z gradients with a single cat.
    zs = torch.split(z, list(widths), dim=1)
    return [zl.view(layer[0].shape).to(layer[0].dtype) for zl, layer in zip(zs, layers)], kl


# --------------------------------------------------------------------------------------------------
# Discretized mixture of logistics
# --------------------------------------------------------------------------------------------------
def _dml_grid(params: torch.Tensor) -> tuple[tuple[int, int], int, int, int]:
    """(grid, pixels per image, pixels per program, warps)."""
    num_pixels = params.shape[2] * params.shape[3]
    block_p, num_warps = dml_kernels.launch_config()
    num_blocks = triton.cdiv(num_pixels, block_p)
    return (params.shape[0], num_blocks), num_pixels, block_p, num_warps


def _dml_empty(x, params, num_mix, want_grad):
    grad = torch.empty_like(params) if want_grad else params.new_empty(0)
    return params.new_empty(params.shape[0], dtype=torch.float32), grad


@_define("dml_log_prob", _dml_empty)
def _dml_log_prob_op(x: torch.Tensor, params: torch.Tensor, num_mix: int,
                     want_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x) (B,), d log p / d params or an empty tensor); one pass over params."""
    grid, num_pixels, block_p, num_warps = _dml_grid(params)
    partial = params.new_empty(grid, dtype=torch.float32)
    grad = torch.empty_like(params) if want_grad else params.new_empty(0)
    _launch(dml_kernels.dml_log_prob_kernel)[grid](
        x, params, partial, params if not want_grad else grad, num_pixels, grid[1],
        M=num_mix, M_PAD=dml_kernels.padded_mix(num_mix), BLOCK_P=block_p, WANT_GRAD=want_grad,
        num_warps=num_warps)
    return partial.sum(1), grad


def _dml_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    # The gradient output is internal: never materialise a zero gradient for it.
    ctx.set_materialize_grads(False)


def _dml_backward(ctx, dlogp, dgrad):
    (grad,) = ctx.saved_tensors
    # The forward kernel already produced d log p / d params; the chain rule is a per-image scale.
    dparams = (grad * dlogp.view(-1, 1, 1, 1)).to(grad.dtype)
    return None, dparams, None, None


torch.library.register_autograd("dvp_fast::dml_log_prob", _dml_backward, setup_context=_dml_setup)


@register("dml_log_prob", "triton")
def dml_log_prob_triton(x: torch.Tensor, params: torch.Tensor, num_mix: int) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("dml_log_prob: backend='triton' treats x as discrete data and does not "
                           "differentiate with respect to it; pass x.detach()")
    want_grad = params.requires_grad and torch.is_grad_enabled()
    params = params.to(_kernel_dtype(params)).contiguous()
    logp, _ = _dml_log_prob_op(x.float().contiguous(), params, num_mix, want_grad)
    return logp


@_define("dml_sample", lambda params, seed, temperature, num_mix: params.new_empty(
    params.shape[0], 3, params.shape[2], params.shape[3], dtype=torch.float32))
def _dml_sample_op(params: torch.Tensor, seed: torch.Tensor, temperature: float, num_mix: int) -> torch.Tensor:
    out = params.new_empty(params.shape[0], 3, params.shape[2], params.shape[3], dtype=torch.float32)
    grid, num_pixels, block_p, num_warps = _dml_grid(params)
    _launch(dml_kernels.dml_sample_kernel)[grid](
        params, seed, out, num_pixels, temperature, M=num_mix, M_PAD=dml_kernels.padded_mix(num_mix),
        BLOCK_P=block_p, num_warps=num_warps)
    return out


@register("dml_sample", "triton")
def dml_sample_triton(params: torch.Tensor, temperature: float, num_mix: int) -> torch.Tensor:
    # A sample is discrete: no gradient flows, so the op never sees params' autograd history.
    params = params.detach().to(_kernel_dtype(params)).contiguous()
    return _dml_sample_op(params, _draw_seed(params.device), float(temperature), num_mix)
