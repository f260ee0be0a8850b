"""dml_log_prob and dml_sample on the "triton" backend: custom ops launching kernels/dml.py, and autograd
for the likelihood (its forward kernel already writes d log p / d params).

See `triton_launch` for the two layers (custom op, then the plain function the registry lists).
"""
import torch
import triton

from dvp_fast.kernels import dml as dml_kernels

from . import triton_launch as tl


def _dml_grid(params: torch.Tensor) -> tuple[tuple[int, int], int, int, int]:
    """(grid, pixels per image, pixels per program, warps)."""
    num_pixels = params.shape[2] * params.shape[3]
    block_p, num_warps = dml_kernels.launch_config()
    num_blocks = triton.cdiv(num_pixels, block_p)
    return (params.shape[0], num_blocks), num_pixels, block_p, num_warps


def _dml_empty(x, params, num_mix, want_grad):
    grad = torch.empty_like(params) if want_grad else params.new_empty(0)
    return params.new_empty(params.shape[0], dtype=torch.float32), grad


@tl.define("dml_log_prob", _dml_empty)
def _dml_log_prob_op(x: torch.Tensor, params: torch.Tensor, num_mix: int,
                     want_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x) (B,), d log p / d params or an empty tensor); one pass over params."""
    grid, num_pixels, block_p, num_warps = _dml_grid(params)
    partial = params.new_empty(grid, dtype=torch.float32)
    grad = torch.empty_like(params) if want_grad else params.new_empty(0)
    tl.launch(dml_kernels.dml_log_prob_kernel)[grid](
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


def dml_log_prob_triton(x: torch.Tensor, params: torch.Tensor, num_mix: int) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("dml_log_prob: backend='triton' treats x as discrete data and does not "
                           "differentiate with respect to it; pass x.detach()")
    want_grad = params.requires_grad and torch.is_grad_enabled()
    params = params.to(tl.kernel_dtype(params)).contiguous()
    logp, _ = _dml_log_prob_op(x.float().contiguous(), params, num_mix, want_grad)
    return logp


@tl.define("dml_sample", lambda params, seed, temperature, num_mix: params.new_empty(
    params.shape[0], 3, params.shape[2], params.shape[3], dtype=torch.float32))
def _dml_sample_op(params: torch.Tensor, seed: torch.Tensor, temperature: float, num_mix: int) -> torch.Tensor:
    out = params.new_empty(params.shape[0], 3, params.shape[2], params.shape[3], dtype=torch.float32)
    grid, num_pixels, block_p, num_warps = _dml_grid(params)
    tl.launch(dml_kernels.dml_sample_kernel)[grid](
        params, seed, out, num_pixels, temperature, M=num_mix, M_PAD=dml_kernels.padded_mix(num_mix),
        BLOCK_P=block_p, num_warps=num_warps)
    return out


def dml_sample_triton(params: torch.Tensor, temperature: float, num_mix: int) -> torch.Tensor:
    # A sample is discrete: no gradient flows, so the op never sees params' autograd history.
    params = params.detach().to(tl.kernel_dtype(params)).contiguous()
    return _dml_sample_op(params, tl.draw_seed(params.device), float(temperature), num_mix)
