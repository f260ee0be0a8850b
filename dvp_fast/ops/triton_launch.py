"""Launch helpers shared by the Triton ops (dct_triton, gaussian_kl_triton, dml_triton).

Each op has two layers:
  * a custom op `dvp_fast::<name>` whose body only allocates outputs and launches kernels
    (`define`). On a GPU it is a `torch.library.triton_op` launching through `wrap_triton`,
    so torch.compile traces into the launches without graph breaks; under TRITON_INTERPRET=1
    (CPU tensors, no GPU) wrap_triton cannot trace the interpreter's functions, so the same
    body is registered as an opaque `custom_op` with a shape-only fake instead.
    `register_autograd` attaches the backward (itself a custom op) in both cases.
  * a plain function, listed in the registry (`_backend.IMPLEMENTATIONS`), that prepares the
    arguments every launch needs (contiguous inputs, the cached DCT basis, a Philox seed drawn
    on the device from torch's RNG, the grouped offsets) and that torch.compile traces as
    ordinary PyTorch.
Nothing here reads a tensor value on the host, so no op synchronises.
"""
import contextlib
from typing import Callable

import torch
from torch.library import triton_op, wrap_triton

from ._backend import triton_interpreting

INTERPRET = triton_interpreting()
# The kernels are compiled for these storage dtypes; others are computed in float32.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def define(name: str, fake: Callable) -> Callable[[Callable], object]:
    """Register `fn` as the custom op dvp_fast::name (see the module docstring for the two cases)."""

    def wrap(fn: Callable):
        qualname = f"dvp_fast::{name}"
        if INTERPRET:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
            op.register_fake(fake)
            return op
        return triton_op(qualname, fn, mutates_args=())

    return wrap


def device_guard(device: torch.device):
    """torch.cuda.device(device) for a CUDA device; nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Launcher:
    """`kernel[grid](*args, **meta)` launched on the device of the first tensor argument.

    Triton launches on the *current* CUDA device (and its current stream), not on the device of
    the tensors it is given, so a model on cuda:1 would launch its kernels on cuda:0; the guard
    makes the tensors' device current for the launch (a cheap device exchange, undone after).
    """

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def guarded(*args, **meta):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            with device_guard(device):
                return launch(*args, **meta)

        return guarded


def launch(kernel):
    """`launch(kernel)[grid](*args, **meta)`. The ops call it as `triton_launch.launch`, so that a test
    can replace it (and `wrap_triton`) here to record every launch."""
    return Launcher(kernel if INTERPRET else wrap_triton(kernel))


def draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox key from torch's RNG, drawn on the device (no sync); manual_seed makes it reproducible."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A pointer for a kernel argument that a constexpr flag guarantees is never read."""
    return torch.empty(1, dtype=dtype, device=device)


def save_inputs(ctx, inputs, output):
    """setup_context for register_autograd: keep every input for backward."""
    ctx.save_for_backward(*inputs)


def kernel_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The inputs' common dtype if the kernels are compiled for it, else fp32 (float64: math is fp32 anyway)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in KERNEL_DTYPES else torch.float32
