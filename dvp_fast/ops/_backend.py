"""The op registry: which backend implements which op, and the one place where an op's backend is chosen.

Every public op takes ``backend="auto" | "triton" | "cpp" | "torch"``:
  * "torch"  - the pure-PyTorch fallback, written from the equations; the reference;
  * "triton" - fused Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  * "cpp"    - native C++ CPU kernels from csrc/, built just in time;
  * "auto"   - triton for CUDA tensors, cpp for CPU tensors when built, else torch.
An explicitly requested backend that cannot run raises a RuntimeError that says why.

The backends are data (`IMPLEMENTATIONS`: backend -> op -> "module:function" in dvp_fast.ops).
This module imports none of them: `_load` imports a backend's modules (after its prerequisite:
triton importable, or the C++ library built and loaded) the first time the backend is asked for,
and remembers the outcome. Tests and tools that must pretend a backend is missing call
`mark_unavailable` (for the process) or `backend_unavailable` (a with-block); `reset_availability`
forgets what is known, so that the next question loads the backend again.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")

# backend -> op -> "module:function" (modules relative to dvp_fast.ops). Each op's module is named after it:
# <op>.py holds the public function and its fallback, <op>_triton.py and <op>_cpp.py the kernels' bindings.
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "torch": {
        "dct_crop": ".dct:dct_crop_torch",
        "idct_pad": ".dct:idct_pad_torch",
        "gaussian_sample_kl": ".gaussian_kl:gaussian_sample_kl_torch",
        "gaussian_sample_kl_grouped": ".gaussian_kl:gaussian_sample_kl_grouped_torch",
        "dml_log_prob": ".dml:dml_log_prob_torch",
        "dml_sample": ".dml:dml_sample_torch",
        "conv1x1": ".conv1x1:conv1x1_torch",
    },
    "triton": {  # no conv1x1: on CUDA, cuDNN already does it well
        "dct_crop": ".dct_triton:dct_crop_triton",
        "idct_pad": ".dct_triton:idct_pad_triton",
        "gaussian_sample_kl": ".gaussian_kl_triton:gaussian_sample_kl_triton",
        "gaussian_sample_kl_grouped": ".gaussian_kl_triton:gaussian_sample_kl_grouped_triton",
        "dml_log_prob": ".dml_triton:dml_log_prob_triton",
        "dml_sample": ".dml_triton:dml_sample_triton",
    },
    "cpp": {
        "dct_crop": ".dct_cpp:dct_crop_cpp",
        "idct_pad": ".dct_cpp:idct_pad_cpp",
        "gaussian_sample_kl": ".gaussian_kl_cpp:gaussian_sample_kl_cpp",
        "gaussian_sample_kl_grouped": ".gaussian_kl_cpp:gaussian_sample_kl_grouped_cpp",
        "dml_log_prob": ".dml_cpp:dml_log_prob_cpp",
        "dml_sample": ".dml_cpp:dml_sample_cpp",
        "conv1x1": ".conv1x1_cpp:conv1x1_cpp",
    },
}
# backend -> (what must work before its modules are imported: a module to import, or a "module:function"
# to call; the exceptions that mean "unavailable"; the reason's prefix).
_PREREQUISITES: dict[str, tuple[str, tuple[type[BaseException], ...], str]] = {
    "triton": ("triton", (Exception,), "triton cannot be imported"),  # ImportError, or a broken install
    "cpp": (".cpp_build:load_library", (ImportError,), "the C++ kernels are not available"),  # builds on first use
}
# backend -> the reason's prefix when one of its modules fails to import.
_MODULES_MISSING = {"triton": "the Triton kernels are not installed", "cpp": "the C++ kernels are not available",
                    "torch": "the fallbacks cannot be imported"}

# Memoised in plain dicts rather than functools.lru_cache: torch.compile traces through the dispatch,
# and it reads a global as a constant but re-traces an lru_cache'd function.
_STATUS: dict[str, tuple[bool, str]] = {}  # backend -> (available, why not), once asked
_REGISTRY: dict[str, dict[str, Callable]] = {}  # op -> backend -> implementation, for the loaded backends
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


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _resolve(target: str):
    """The module "module" names, or the object "module:name" names; a leading "." means in dvp_fast.ops."""
    module, _, name = target.partition(":")
    imported = importlib.import_module(module, __package__)
    return getattr(imported, name) if name else imported


def _constant_for_torch_compile(fn: Callable) -> Callable:
    """torch.compiler.assume_constant_result(fn), without importing torch._dynamo (1-2 s) here: the mark
    it sets. torch.compile then runs `fn` at trace time instead of tracing it (importlib inside a trace
    is a graph break, which fullgraph=True refuses) and takes its result as a constant."""
    fn._dynamo_marked_constant = True
    return fn


# The first question about a backend may come inside a torch.compile trace; the registry this fills is
# then read there like any global.
@_constant_for_torch_compile
def _load(backend: str) -> tuple[bool, str]:
    """Import `backend`'s modules after its prerequisite and fill the registry: (available, why not)."""
    if backend in _PREREQUISITES:
        target, failures, prefix = _PREREQUISITES[backend]
        try:
            prerequisite = _resolve(target)
            if ":" in target:  # a function to run: the C++ build
                prerequisite()
        except failures as exc:
            return False, f"{prefix} ({exc})"
    try:
        found = {op: _resolve(target) for op, target in IMPLEMENTATIONS[backend].items()}
    except ImportError as exc:
        return False, f"{_MODULES_MISSING[backend]} ({exc})"
    for op, fn in found.items():
        _REGISTRY.setdefault(op, {})[backend] = fn
    return True, ""


def availability(backend: str) -> tuple[bool, str]:
    """(available, reason if not) for a whole backend; the first call for cpp builds the C++ kernels."""
    if backend == "auto":
        return True, ""
    status = _STATUS.get(backend)
    if status is None:
        status = _STATUS[backend] = _load(backend)
    return status


def backend_available(backend: str) -> bool:
    return availability(backend)[0]


def mark_unavailable(backend: str, reason: str) -> None:
    """Make `backend` report itself unavailable with `reason` from now on in this process ("auto" then
    skips it; an explicit request raises the reason). For tests and tools, e.g. a run pinned to the
    fallback; `reset_availability` undoes it."""
    if backend not in BACKENDS or backend in ("auto", "torch"):
        raise ValueError(f"mark_unavailable: backend must be 'triton' or 'cpp', got {backend!r}")
    _STATUS[backend] = (False, reason)


@contextlib.contextmanager
def backend_unavailable(backend: str, reason: str) -> Iterator[None]:
    """`mark_unavailable` inside the block only; what was known before comes back after it."""
    before = _STATUS.get(backend)
    mark_unavailable(backend, reason)
    try:
        yield
    finally:
        if before is None:
            _STATUS.pop(backend, None)
        else:
            _STATUS[backend] = before


def reset_availability(backend: str | None = None) -> None:
    """Forget what is known about `backend` (every backend when None): the next question asks again."""
    for name in [backend] if backend is not None else list(_STATUS):
        _STATUS.pop(name, None)


def choose_backend(op: str, backend: str, device: torch.device) -> str:
    """Resolve `backend` for `op` on tensors living on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    override = getattr(_AUTO_OVERRIDE, "value", None)
    if backend == "auto" and override is not None:
        # Ops the chosen backend has no kernel for (conv1x1 has none in Triton) keep the fallback.
        if override != "torch" and availability(override)[0] and not implements(op, override):
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
    ok, why = availability(backend)
    if not ok:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
    if not implements(op, backend):
        raise RuntimeError(f"{op}: backend={backend!r} has no implementation of this op")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )
    if backend == "cpp" and device.type != "cpu":
        raise RuntimeError(f"{op}: backend='cpp' needs CPU tensors, got {device}")
    return backend


def _usable(op: str, backend: str) -> bool:
    # Availability first: for cpp it is what builds (once) and loads the kernels.
    return availability(backend)[0] and implements(op, backend)


def implements(op: str, backend: str) -> bool:
    """Whether `backend` has a kernel for `op` (from the table: nothing is imported to answer)."""
    return op in IMPLEMENTATIONS.get(backend, {})


def implementation(op: str, backend: str) -> Callable:
    """The function implementing `op` on `backend`, loading the backend if nothing asked for it yet."""
    # Availability first, always: under torch.compile, the registry must be read after the load fills it.
    ok, why = availability(backend)
    if not ok:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
    return _REGISTRY[op][backend]
