"""dml_log_prob and dml_sample on the "cpp" backend: fakes of the csrc/dml.cpp operators, autograd,
wrappers.

See `cpp_launch` for the two layers (operator with a fake, then an autograd.Function).
"""
from __future__ import annotations

import torch

from .cpp_launch import NAMESPACE, NATIVE, OPS, empty, native, needs_grad


@torch.library.register_fake(f"{NAMESPACE}::dml_log_prob")
def _(x, params, num_mix, need_params, need_x):
    return (empty(x, (x.shape[0],), torch.float32), empty(params, params.shape if need_params else (0,), torch.float32),
            empty(x, x.shape if need_x else (0,), torch.float32))


@torch.library.register_fake(f"{NAMESPACE}::scale_rows")
def _(grad_out, g, dtype):
    return empty(g, g.shape, dtype)


@torch.library.register_fake(f"{NAMESPACE}::dml_sample")
def _(params, u_mix, u_logistic, temperature, num_mix):
    return empty(params, (params.shape[0], 3, params.shape[2], params.shape[3]), torch.float32)


class _DmlLogProb(torch.autograd.Function):
    """The forward kernel also writes d log p / d params (and d x); backward only scales them."""

    @staticmethod
    def forward(ctx, x, params, num_mix):
        need_x, need_params = ctx.needs_input_grad[:2]
        logp, g_params, g_x = OPS.dml_log_prob(x, native(params), num_mix, need_params, need_x)
        ctx.save_for_backward(g_params, g_x)
        ctx.dtypes = (x.dtype, params.dtype)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        g_params, g_x = ctx.saved_tensors
        (x_dtype, p_dtype), (need_x, need_params) = ctx.dtypes, ctx.needs_input_grad[:2]
        scaled = lambda g, dtype: OPS.scale_rows(grad_logp, g, dtype if dtype in NATIVE else torch.float32).to(dtype)
        return (scaled(g_x, x_dtype) if need_x else None), (scaled(g_params, p_dtype) if need_params else None), None


def dml_log_prob_cpp(x: torch.Tensor, params: torch.Tensor, num_mix: int) -> torch.Tensor:
    if needs_grad(x, params):
        return _DmlLogProb.apply(x, params, num_mix)
    return OPS.dml_log_prob(x, native(params), num_mix, False, False)[0]


def dml_sample_cpp(params: torch.Tensor, temperature: float, num_mix: int) -> torch.Tensor:
    b, _, h, w = params.shape
    # The fallback's draws, in its order: a uniform per component (none at temperature 0, where the
    # kernel takes the largest logit and reads no u_mix), then one per colour.
    u_mix = params[:, :num_mix].to(torch.float32)
    u_mix = torch.rand_like(u_mix) if temperature > 0 else torch.empty_like(u_mix)
    u_logistic = torch.rand_like(params.new_empty((b, 3, h, w), dtype=torch.float32))
    return OPS.dml_sample(native(params), u_mix.contiguous(), u_logistic, float(temperature), num_mix)
