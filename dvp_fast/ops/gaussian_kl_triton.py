"""gaussian_sample_kl(_grouped) on the "triton" backend: the custom op launching kernels/gaussian_kl.py
(one layer, or every layer as column segments of one launch) and its autograd.

See `triton_launch` for the two layers (custom op, then the plain function the registry lists).
"""
from typing import Optional

import torch

from dvp_fast.kernels import gaussian_kl as kl_kernels

from . import triton_launch as tl


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
                tl.placeholder(torch.int64, dev) if seed is None else seed,
                offsets if grouped else tl.placeholder(torch.int32, dev))
    return (batch, num_segments), pointers, num_segments, meta


@tl.define("gaussian_sample_kl", _kl_empty)
def _sample_kl_op(mu_q: torch.Tensor, lv_q: torch.Tensor, mu_p: torch.Tensor, lv_p: torch.Tensor,
                  noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                  offsets: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, N); noise (B, N) or None (then seed (1,) int64); offsets (L + 1,) int32 or None."""
    z, kl = _kl_empty(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets)
    grid, pointers, num_segments, meta = _kl_launch_args(mu_q, noise, seed, offsets)
    tl.launch(kl_kernels.sample_kl_fwd_kernel)[grid](mu_q, lv_q, mu_p, lv_p, *pointers, z, kl,
                                                     mu_q.shape[1], num_segments, **meta)
    return z, kl


def _kl_backward_empty(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets, dz, dkl):
    return tuple(torch.empty_like(t) for t in (mu_q, lv_q, mu_p, lv_p))


@tl.define("gaussian_sample_kl_backward", _kl_backward_empty)
def _sample_kl_backward_op(mu_q: torch.Tensor, lv_q: torch.Tensor, mu_p: torch.Tensor, lv_p: torch.Tensor,
                           noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                           offsets: Optional[torch.Tensor], dz: torch.Tensor, dkl: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if tuple(dkl.shape) != _kl_shape(mu_q, offsets) or dz.shape != mu_q.shape:
        raise ValueError(f"gaussian_sample_kl_backward: dz {tuple(dz.shape)} / dkl {tuple(dkl.shape)} do not match "
                         f"z {tuple(mu_q.shape)} / kl {_kl_shape(mu_q, offsets)}")  # the kernel would read out of bounds
    grads = _kl_backward_empty(mu_q, lv_q, mu_p, lv_p, noise, seed, offsets, dz, dkl)
    grid, pointers, num_segments, meta = _kl_launch_args(mu_q, noise, seed, offsets)
    tl.launch(kl_kernels.sample_kl_bwd_kernel)[grid](mu_q, lv_q, mu_p, lv_p, *pointers, dz, dkl, *grads,
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


def gaussian_sample_kl_triton(mu_q, logvar_q, mu_p, logvar_p, noise=None):
    inputs = [mu_q, logvar_q, mu_p, logvar_p] + ([] if noise is None else [noise])
    dtype = tl.kernel_dtype(*inputs)
    batch = mu_q.shape[0]
    flat = [t.to(dtype).reshape(batch, -1).contiguous() for t in inputs]
    seed = tl.draw_seed(mu_q.device) if noise is None else None
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


def gaussian_sample_kl_grouped_triton(layers):
    """All layers in one launch: rows are concatenated per input, each layer a segment of columns."""
    batch = layers[0][0].shape[0]
    if any(layer[0].shape[0] != batch for layer in layers):
        raise ValueError("gaussian_sample_kl_grouped: every layer must have the same batch size")
    dtype = tl.kernel_dtype(*(t for layer in layers for t in layer))
    widths = tuple(layer[0].numel() // batch for layer in layers)
    cat = [torch.cat([layer[i].to(dtype).reshape(batch, -1) for layer in layers], dim=1) for i in range(4)]
    offsets = _segment_offsets(widths, layers[0][0].device)
    z, kl = _sample_kl_op(*cat, None, tl.draw_seed(cat[0].device), offsets)
    # split (not slicing) so that backward gathers the z gradients with a single cat.
    zs = torch.split(z, list(widths), dim=1)
    return [zl.view(layer[0].shape).to(layer[0].dtype) for zl, layer in zip(zs, layers)], kl
