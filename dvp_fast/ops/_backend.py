"""The one place where an op's backend is chosen.

Every public op takes ``backend="auto" | "triton" | "cpp" | "torch"``:
  * "torch"  - the pure-PyTorch fallback, written from the equations; the reference;
  * "triton" - fused Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  * "cpp"    - native C++ CPU kernels from csrc/, built just in time;
  * "auto"   - triton for CUDA tensors, cpp for CPU tensors when built, else torch.
An explicitly requested backend that cannot run raises a RuntimeError that says why.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")

# op name -> backend name -> implementation. Backends register themselves on import.
_REGISTRY: dict[str, dict[str, Callable]] = {}
# What "auto" means inside a `use_backend` block (per thread); None = the normal choice.
_AUTO_OVERRIDE = threading.local()


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Make backend="auto" resolve to `backend` inside the block, e.g. the whole model on the
    pure-PyTorch reference path: ``with dvp_fast.ops.use_backend("torch"): model(x)``.

    Ops that `backend` has no kernel for (conv1x1 has none in Triton) keep the fallback. Explicit
    backend= arguments are untouched. Not for use under torch.compile tracing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"use_backend: backend must be one of {BACKENDS}, got {backend!r}")
    previous = getattr(_AUTO_OVERRIDE, "value", None)
    _AUTO_OVERRIDE.value = None if backend == "auto" else backend
    try:
        yield
    finally:
        _AUTO_OVERRIDE.value = previous


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` the implementation of `op` on `backend`."""

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _availability(backend: str) -> tuple[bool, str]:
    """(available, reason if not) for a whole backend."""
    if backend == "triton":
        from . import _triton_loader

        return _triton_loader.status()
    if backend == "cpp":
        from . import _cpp_loader

        return _cpp_loader.status()
    return True, ""


def backend_available(backend: str) -> bool:
    return _availability(backend)[0]


def choose_backend(op: str, backend: str, device: torch.device) -> str:
    """Resolve `backend` for `op` on tensors living on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    override = getattr(_AUTO_OVERRIDE, "value", None)
    if backend == "auto" and override is not None:
        # Ops the chosen backend has no kernel for (conv1x1 has none in Triton) keep the fallback.
        if override != "torch" and _availability(override)[0] and not implements(op, override):
            return "torch"
        backend = override
    if backend == "auto":
        if device.type == "cuda" and _usable(op, "triton"):
            return "triton"
        if device.type == "cpu" and _usable(op, "cpp"):
            return "cpp"
        return "torch"
    if backend == "torch":
        return "torch"
    ok, why = _availability(backend)
    if not ok:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
    if op not in _REGISTRY or backend not in _REGISTRY[op]:
        raise RuntimeError(f"{op}: backend={backend!r} has no implementation of this op")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )
    if backend == "cpp" and device.type != "cpu":
        raise RuntimeError(f"{op}: backend='cpp' needs CPU tensors, got {device}")
    return backend


def _usable(op: str, backend: str) -> bool:
    # Availability first: it imports (and for cpp builds) the backend, which is what registers it.
    return _availability(backend)[0] and implements(op, backend)


def implements(op: str, backend: str) -> bool:
    """Whether `backend` has a kernel for `op` (after the backend was imported, e.g. by backend_available)."""
    return backend in _REGISTRY.get(op, {})


def implementation(op: str, backend: str) -> Callable:
    return _REGISTRY[op][backend]
