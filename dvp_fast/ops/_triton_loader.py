"""Imports the Triton kernels lazily and remembers why they are unavailable."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton cannot be imported ({exc})"
    try:
        from . import triton_backend  # noqa: F401  registers the kernels
    except ImportError as exc:
        return False, f"the Triton kernels are not installed ({exc})"
    return True, ""
