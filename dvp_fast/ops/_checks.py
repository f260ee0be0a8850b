"""Input checks shared by the ops: clear errors naming what was expected and what came.

The ops check types, shapes, dtypes, devices and integer arguments, all of which the host
knows without looking at tensor data. They deliberately never check values (NaN, inf,
ranges): that would read device memory and synchronise the host on every call, which
breaks CUDA-graph capture and stalls the hot loop. Values are checked once, where data
enters the model (`DVPVAE._check_images`, `fit_pseudoinput_scale`, `decode`), and the
trainer skips any step whose loss or gradient is non-finite, on the device.
"""
from __future__ import annotations

import numbers

import torch


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                        f"got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: str, *, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have shape {expected}, got shape {tuple(t.shape)}")


def check_int(op: str, name: str, value, *, minimum: int) -> int:
    """`value` as an int >= `minimum`; floats, strings and bools are refused rather than truncated."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) or value < minimum:
        raise ValueError(f"{op}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_nonempty(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} must have at least one element per batch row and one row, "
                         f"got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def check_same_shape(op: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"{op}: tensors must share one shape, got {listed}")
