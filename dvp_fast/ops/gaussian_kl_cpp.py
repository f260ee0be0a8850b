"""gaussian_sample_kl(_grouped) on the "cpp" backend: fakes of the csrc/gaussian_kl.cpp operators
(lists of layers: one layer or all of them in one call), autograd, wrappers.

See `cpp_launch` for the two layers (operator with a fake, then an autograd.Function).
"""
from __future__ import annotations

import torch

from .cpp_launch import NAMESPACE, NATIVE, OPS, empty, needs_grad, to


@torch.library.register_fake(f"{NAMESPACE}::gaussian_kl")
def _(mu_q, logvar_q, mu_p, logvar_p, noise):
    return [torch.empty_like(m) for m in mu_q], empty(mu_q[0], (mu_q[0].shape[0], len(mu_q)), torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::gaussian_kl_backward")
def _(grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, noise, need):
    return [(torch.empty_like(noise[l]) if which == 4 else torch.empty_like(mu_q[l])) if need & (1 << which)
            else empty(noise[l], (0,)) for which in range(5) for l in range(len(mu_q))]


def _draw_noise(mu_q: torch.Tensor) -> torch.Tensor:
    """The fallback's draw exactly: torch's generator (manual_seed reproduces it), float32, mu_q's layout."""
    return torch.randn_like(mu_q, dtype=torch.float32)


def _layer_inputs(mu_q, logvar_q, mu_p, logvar_p, noise):
    """One layer's kernel inputs: the four contiguous in one native dtype, noise contiguous float32."""
    four = (mu_q, logvar_q, mu_p, logvar_p)
    dtype = mu_q.dtype
    if dtype not in NATIVE or any(t.dtype != dtype for t in four):
        dtype = torch.float32
    return [to(t, dtype).contiguous() for t in four] + [to(noise, torch.float32).contiguous()]


def _need_mask(needs) -> int:
    """Bit w set when any tensor of input group w (mu_q, logvar_q, mu_p, logvar_p, noise) needs a gradient."""
    per_group = len(needs) // 5
    return sum(1 << w for w in range(5) if any(needs[w * per_group:(w + 1) * per_group]))


class _GaussianSampleKL(torch.autograd.Function):
    """One layer: (mu_q, logvar_q, mu_p, logvar_p, noise) -> (z, kl (B,)). Backward reads the saved noise."""

    @staticmethod
    def forward(ctx, mu_q, logvar_q, mu_p, logvar_p, noise):
        inputs = _layer_inputs(mu_q, logvar_q, mu_p, logvar_p, noise)
        (z,), kl = OPS.gaussian_kl(*[[t] for t in inputs])
        ctx.save_for_backward(*inputs)
        ctx.dtypes = (mu_q.dtype, logvar_q.dtype, mu_p.dtype, logvar_p.dtype, noise.dtype)
        ctx.set_materialize_grads(False)
        return to(z, mu_q.dtype), kl.view(-1)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        saved = ctx.saved_tensors
        if grad_kl is None:
            grad_kl = torch.zeros(saved[0].shape[0])
        needs = ctx.needs_input_grad
        grads = OPS.gaussian_kl_backward([grad_z], grad_kl.reshape(-1, 1), *[[t] for t in saved], _need_mask(needs))
        return tuple(to(g, dtype) if need else None for g, dtype, need in zip(grads, ctx.dtypes, needs))


class _GaussianKLGrouped(torch.autograd.Function):
    """inputs: num_layers, then mu_q[L], logvar_q[L], mu_p[L], logvar_p[L], noise[L]; outputs: z[L], kl (B, L)."""

    @staticmethod
    def forward(ctx, num_layers, *flat):
        layers = [_layer_inputs(*flat[l::num_layers]) for l in range(num_layers)]
        groups = [[layer[i] for layer in layers] for i in range(5)]
        zs, kl = OPS.gaussian_kl(*groups)
        ctx.save_for_backward(*[t for group in groups for t in group])
        ctx.num_layers = num_layers
        ctx.dtypes = [t.dtype for t in flat]
        ctx.set_materialize_grads(False)
        return (*[to(z, flat[l].dtype) for l, z in enumerate(zs)], kl)

    @staticmethod
    def backward(ctx, *grads):
        L, saved = ctx.num_layers, ctx.saved_tensors
        groups = [list(saved[i * L:(i + 1) * L]) for i in range(5)]
        grad_kl = grads[L] if grads[L] is not None else torch.zeros(saved[0].shape[0], L)
        needs = ctx.needs_input_grad[1:]
        out = OPS.gaussian_kl_backward(list(grads[:L]), grad_kl, *groups, _need_mask(needs))
        return (None, *[to(out[i], ctx.dtypes[i]) if needs[i] else None for i in range(5 * L)])


def gaussian_sample_kl_cpp(mu_q, logvar_q, mu_p, logvar_p, noise=None):
    if noise is None:
        noise = _draw_noise(mu_q)
    if needs_grad(mu_q, logvar_q, mu_p, logvar_p, noise):
        return _GaussianSampleKL.apply(mu_q, logvar_q, mu_p, logvar_p, noise)
    (z,), kl = OPS.gaussian_kl(*[[t] for t in _layer_inputs(mu_q, logvar_q, mu_p, logvar_p, noise)])
    return to(z, mu_q.dtype), kl.view(-1)


def gaussian_sample_kl_grouped_cpp(layers):
    noises = [_draw_noise(layer[0]) for layer in layers]  # in layer order, as the fallback draws them
    flat = [layer[i] for i in range(4) for layer in layers] + noises
    if needs_grad(*flat):
        *zs, kl = _GaussianKLGrouped.apply(len(layers), *flat)
        return zs, kl
    inputs = [_layer_inputs(*layer, noise) for layer, noise in zip(layers, noises)]
    zs, kl = OPS.gaussian_kl(*[[layer[i] for layer in inputs] for i in range(5)])
    return [to(z, layer[0].dtype) for z, layer in zip(zs, layers)], kl
