"""dct_crop and idct_pad on the "cpp" backend: fakes of the csrc/dct.cpp operators, autograd, wrappers.

See `cpp_launch` for the two layers (operator with a fake, then an autograd.Function).
"""
from __future__ import annotations

import torch

from .cpp_launch import NAMESPACE, OPS, empty, native, needs_grad, output
from .dct import dct_basis


@torch.library.register_fake(f"{NAMESPACE}::dct_crop")
def _(x, scale, basis):
    shape = (x.shape[0], x.shape[1], basis.shape[0], basis.shape[0])
    return empty(x, shape), empty(x, shape, torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::dct_crop_backward")
def _(grad_y, ratio, scale, basis, need_x, need_scale, x_dtype):
    b, c, d, _ = ratio.shape
    return (empty(ratio, (b if need_x else 0, c, basis.shape[1], basis.shape[1]), x_dtype),
            empty(ratio, (c, d, d) if need_scale else (0,)))


@torch.library.register_fake(f"{NAMESPACE}::idct_pad")
def _(u, scale, basis, size, need_mask):
    b, c = u.shape[:2]
    return empty(u, (b, c, size, size)), empty(u, (b if need_mask else 0, c, size, size), torch.bool)


@torch.library.register_fake(f"{NAMESPACE}::idct_pad_backward")
def _(grad_out, mask, u, scale, basis, need_u, need_scale):
    b, c, d, _ = u.shape
    return empty(u, (b if need_u else 0, c, d, d)), empty(u, (c, d, d) if need_scale else (0,), torch.float32)


class _DctCrop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, basis):
        xk = native(x)
        scale32 = scale.float().contiguous()
        y, ratio = OPS.dct_crop(xk, scale32, basis)
        ctx.save_for_backward(ratio, scale32, basis)
        ctx.dtypes = (x.dtype, xk.dtype, scale.dtype)
        return output(y, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        ratio, scale32, basis = ctx.saved_tensors
        x_dtype, k_dtype, scale_dtype = ctx.dtypes
        need_x, need_scale = ctx.needs_input_grad[:2]
        gx, gs = OPS.dct_crop_backward(grad_y.to(k_dtype).contiguous(), ratio, scale32, basis, need_x, need_scale,
                                        k_dtype)
        return (gx.to(x_dtype) if need_x else None), (gs.to(scale_dtype) if need_scale else None), None


def dct_crop_cpp(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    basis = dct_basis(scale.shape[-1], x.shape[-1])
    if needs_grad(x, scale):
        return _DctCrop.apply(x, scale, basis)
    return OPS.dct_crop(native(x), scale.float().contiguous(), basis)[0].to(x.dtype)


class _IdctPad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, scale, basis, size):
        uk = native(u)
        scale32 = scale.float().contiguous()
        out, mask = OPS.idct_pad(uk, scale32, basis, size, True)
        ctx.save_for_backward(mask, uk, scale32, basis)
        ctx.dtypes = (u.dtype, scale.dtype)
        return output(out, u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        mask, uk, scale32, basis = ctx.saved_tensors
        u_dtype, scale_dtype = ctx.dtypes
        need_u, need_scale = ctx.needs_input_grad[:2]
        gu, gs = OPS.idct_pad_backward(grad_out.to(uk.dtype).contiguous(), mask, uk, scale32, basis, need_u,
                                        need_scale)
        return (gu.to(u_dtype) if need_u else None), (gs.to(scale_dtype) if need_scale else None), None, None


def idct_pad_cpp(u: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    basis = dct_basis(u.shape[-1], size)
    if needs_grad(u, scale):
        return _IdctPad.apply(u, scale, basis, size)
    return OPS.idct_pad(native(u), scale.float().contiguous(), basis, size, False)[0].to(u.dtype)
