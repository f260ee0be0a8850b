"""A 1x1 convolution with an optional SiLU on its input: y = W act(x) + b.

The ladder's residual blocks are SiLU -> 1x1 conv and SiLU -> 3x3 conv (SPEC §5-6); on CPU the
1x1 convolutions and the SiLUs before them took about 30% of an mnist training step on the
fallback. The cpp kernel computes act(x) on the fly (it is never stored: backward recomputes it
from x) and runs the products as GEMMs. There is no Triton kernel: on CUDA, "auto" uses the
fallback (cuDNN), which is already fast there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import choose_backend, implementation
from ._checks import check_floating, check_same_device, check_shape

_OP = "conv1x1"


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_floating(_OP, "x", x)
    check_floating(_OP, "weight", weight)
    check_shape(_OP, "x", x, "(B, Cin, H, W)", ndim=4)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{_OP}: x must have H, W >= 1, got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{_OP}: weight must have shape (Cout, {x.shape[1]}, 1, 1) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None:
        check_floating(_OP, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{_OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(_OP, x=x, weight=weight, bias=bias)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu: bool = False,
            backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(F.silu(x) if silu else x, weight, bias)`` for weight (Cout, Cin, 1, 1): (B, Cout, H, W).

    Outside torch.autocast, x, weight and bias must share one dtype, as F.conv2d requires. Under
    autocast the fallback is exactly the expression above; a fused kernel gets its inputs cast to
    the autocast dtype, as F.conv2d's autocast rule would cast them.
    """
    _check_args(x, weight, bias)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if not autocast:
        dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
        if len(dtypes) > 1:
            raise TypeError(f"{_OP}: x, weight and bias must share one dtype (or run under torch.autocast), got "
                            f"x {x.dtype}, weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}"))
    chosen = choose_backend(_OP, backend, x.device)
    fn = implementation(_OP, chosen)
    if autocast and chosen != "torch":  # the kernels know nothing of autocast
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return fn(x, weight, bias, silu)
    return fn(x, weight, bias, silu)


def conv1x1_torch(x, weight, bias, silu):
    return F.conv2d(F.silu(x) if silu else x, weight, bias)
