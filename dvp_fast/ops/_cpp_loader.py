"""Builds and loads the native CPU kernels lazily and remembers why they are unavailable."""
from __future__ import annotations

# Memoised in a plain global rather than functools.lru_cache: torch.compile traces through
# the dispatch, and it reads a global as a constant but re-traces an lru_cache'd function.
_STATUS: tuple[bool, str] | None = None


def status() -> tuple[bool, str]:
    global _STATUS
    if _STATUS is None:
        _STATUS = _load()
    return _STATUS


def _load() -> tuple[bool, str]:
    try:
        from . import cpp_backend  # noqa: F401  builds (once) and registers the kernels
    except ImportError as exc:
        return False, f"the C++ kernels are not available ({exc})"
    return True, ""
