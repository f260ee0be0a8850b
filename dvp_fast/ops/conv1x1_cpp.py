"""conv1x1 on the "cpp" backend: fakes of the csrc/conv1x1.cpp operators, autograd, wrapper.

See `cpp_launch` for the two layers (operator with a fake, then an autograd.Function).
"""
from __future__ import annotations

import torch

from .cpp_launch import NAMESPACE, OPS, empty, native, needs_grad, to


@torch.library.register_fake(f"{NAMESPACE}::conv1x1")
def _(x, weight, silu):
    return empty(x, (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@torch.library.register_fake(f"{NAMESPACE}::conv1x1_backward")
def _(grad_y, x, weight, silu, need_x, need_weight):
    return empty(x, x.shape if need_x else (0,)), empty(weight, weight.shape if need_weight else (0,))


def _weight_with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(Cout, Cin + 1) float32: the kernel takes the bias as the weight's last column."""
    w = weight.reshape(weight.shape[0], weight.shape[1]).float()
    b = bias.float() if bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], dim=1).contiguous()


class _Conv1x1(torch.autograd.Function):
    """Saves x, not act(x): backward recomputes the SiLU inside the kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        xk, wb = native(x), _weight_with_bias(weight, bias)
        ctx.save_for_backward(xk, wb)
        ctx.silu, ctx.dtypes = silu, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return to(OPS.conv1x1(xk, wb, silu), x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        xk, wb = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gx, gwb = OPS.conv1x1_backward(to(grad_y, xk.dtype).contiguous(), xk, wb, ctx.silu, need_x,
                                        need_w or need_b)
        cin = xk.shape[1]
        gw = to(gwb[:, :cin], w_dtype).reshape(gwb.shape[0], cin, 1, 1) if need_w else None
        gb = to(gwb[:, cin], b_dtype) if need_b else None
        return (to(gx, x_dtype) if need_x else None), gw, gb, None


def conv1x1_cpp(x, weight, bias, silu):
    if needs_grad(x, weight, bias):
        return _Conv1x1.apply(x, weight, bias, silu)
    return to(OPS.conv1x1(native(x), _weight_with_bias(weight, bias), silu), x.dtype)
