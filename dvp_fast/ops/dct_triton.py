"""dct_crop and idct_pad on the "triton" backend: custom ops launching kernels/dct.py, their autograd.

See `triton_launch` for the two layers (custom op, then the plain function the registry lists).
"""
import torch

from dvp_fast.kernels import dct as dct_kernels

from . import triton_launch as tl
from .dct import dct_basis, dct_coefficients


def _dct_grid_and_blocks(planes: int, d: int, size: int) -> tuple[tuple[int], dict]:
    block_small, block_large = dct_kernels.block_sizes(d, size)
    return (planes,), dict(BLOCK_d=block_small, BLOCK_D=block_large, num_warps=dct_kernels.NUM_WARPS)


# ------------------------------------------------------------------------------------------ dct_crop
def _dct_crop_empty(x, scale, basis):
    return x.new_empty(x.shape[0], x.shape[1], scale.shape[-1], scale.shape[-1])


@tl.define("dct_crop", _dct_crop_empty)
def _dct_crop_op(x: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    y = _dct_crop_empty(x, scale, basis)
    b, c, size, _ = x.shape
    d = scale.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    tl.launch(dct_kernels.dct_crop_fwd_kernel)[grid](x, basis, scale, y, c, d, size, **meta)
    return y


@tl.define("dct_crop_backward", lambda x, scale, basis, dy: torch.empty_like(x))
def _dct_crop_backward_op(x: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor,
                          dy: torch.Tensor) -> torch.Tensor:
    dx = torch.empty_like(x)
    b, c, size, _ = x.shape
    d = scale.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    tl.launch(dct_kernels.dct_crop_bwd_kernel)[grid](x, basis, scale, dy, dx, c, d, size, **meta)
    return dx


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


torch.library.register_autograd("dvp_fast::dct_crop", _dct_crop_backward, setup_context=tl.save_inputs)


def dct_crop_triton(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    basis = dct_basis(scale.shape[-1], x.shape[-1], device=x.device)
    # The kernels are fp32-only (one compiled variant per tile); these tensors are tiny.
    return _dct_crop_op(x.float().contiguous(), scale.float().contiguous(), basis).to(x.dtype)


# ------------------------------------------------------------------------------------------ idct_pad
def _idct_pad_empty(u, scale, basis):
    return u.new_empty(u.shape[0], u.shape[1], basis.shape[-1], basis.shape[-1])


@tl.define("idct_pad", _idct_pad_empty)
def _idct_pad_op(u: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    out = _idct_pad_empty(u, scale, basis)
    b, c, d, _ = u.shape
    size = basis.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    tl.launch(dct_kernels.idct_pad_fwd_kernel)[grid](u, scale, basis, out, c, d, size, **meta)
    return out


@tl.define("idct_pad_backward", lambda u, scale, basis, dout: torch.empty_like(u))
def _idct_pad_backward_op(u: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor,
                          dout: torch.Tensor) -> torch.Tensor:
    du = torch.empty_like(u)
    b, c, d, _ = u.shape
    size = basis.shape[-1]
    grid, meta = _dct_grid_and_blocks(b * c, d, size)
    tl.launch(dct_kernels.idct_pad_bwd_kernel)[grid](u, scale, basis, dout, du, c, d, size, **meta)
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


torch.library.register_autograd("dvp_fast::idct_pad", _idct_pad_backward, setup_context=tl.save_inputs)


def idct_pad_triton(u: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    basis = dct_basis(u.shape[-1], size, device=u.device)
    return _idct_pad_op(u.float().contiguous(), scale.float().contiguous(), basis).to(u.dtype)
