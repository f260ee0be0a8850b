"""Helpers shared by the C++ bindings (dct_cpp, gaussian_kl_cpp, dml_cpp, conv1x1_cpp).

Each op has two layers:
  * a torch operator ``torch.ops.dvp_fast_cpp.<name>`` (csrc/bindings.cpp, loaded by
    `cpp_build.load_library`) with a shape-only fake in the op's module, so torch.compile can
    trace through it;
  * a torch.autograd.Function that prepares arguments (contiguous, float32 or bfloat16, the
    cached DCT basis, the noise drawn from torch's generator) and calls the forward and
    backward operators; with no gradient needed the operator is called directly.
Importing this module loads the C++ library (`cpp_build.load_library`, cached; it builds only where
no build is cached), because a fake can only be registered for an operator that exists. The registry
imports it only after its own first call of `load_library`, so `import dvp_fast.ops` builds nothing.
"""
from __future__ import annotations

import torch

from .cpp_build import load_library

load_library()  # raises ImportError (after one warning) where the kernels cannot be built or loaded
NAMESPACE = "dvp_fast_cpp"
OPS = torch.ops.dvp_fast_cpp
# Kernels exist for these storage dtypes; others are computed in float32 and cast back.
NATIVE = (torch.float32, torch.bfloat16)


def empty(ref: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An uninitialised tensor like `ref`, for the fakes."""
    return ref.new_empty(shape, dtype=dtype or ref.dtype)


def native(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor of a dtype the kernels take (float16/float64 go through float32)."""
    return (t if t.dtype in NATIVE else t.float()).contiguous()


def output(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, as an autograd.Function's output: a copy while torch.compile traces, because
    torch 2.11's dynamo gave a zero gradient for an output that is the custom op's own result."""
    return t.to(dtype, copy=torch.compiler.is_compiling())


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
