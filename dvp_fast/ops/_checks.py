"""Input checks shared by the ops: clear errors naming what was expected and what came."""
from __future__ import annotations

import torch


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float32, bfloat16 or float16), "
                        f"got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: str, *, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have shape {expected}, got shape {tuple(t.shape)}")


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
