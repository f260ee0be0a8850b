"""Builds and loads the native CPU kernels lazily and remembers why they are unavailable."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    try:
        from . import cpp_backend  # noqa: F401  builds (once) and registers the kernels
    except ImportError as exc:
        return False, f"the C++ kernels are not available ({exc})"
    return True, ""
