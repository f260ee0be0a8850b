"""The C++ build system of the "cpp" backend: csrc/ compiled with ninja, loaded on first use.

`load_library()` builds the extension once per (source contents, torch version, Python ABI, CPU
instruction set and flags) into ``$DVP_FAST_CACHE`` (default ``~/.cache/dvp_fast``) and loads it
into ``torch.ops.dvp_fast_cpp``; where the package or torch is installed is no part of the key,
so an editable checkout and an installed copy share one build. Nothing is built at import: the
registry (`_backend`) calls `load_library` the first time the cpp backend is asked for. Without a
C++ compiler or ninja, or when the build fails, it warns once and raises ImportError, so
``backend="auto"`` falls back to torch and an explicit ``backend="cpp"`` raises the reason (with
the compiler's message).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

_NAME = "dvp_fast_cpp"
_SOURCES = ("common.h", "dct.cpp", "gaussian_kl.cpp", "dml.cpp", "conv1x1.cpp", "bindings.cpp")


def source_dir() -> Path:
    """csrc/ as installed (package data `dvp_fast.csrc`), or beside the package in a checkout."""
    try:
        import dvp_fast.csrc as csrc

        return Path(next(iter(csrc.__path__)))
    except ImportError:
        return Path(__file__).resolve().parents[2] / "csrc"


def cache_root() -> Path:
    if os.environ.get("DVP_FAST_CACHE"):
        return Path(os.environ["DVP_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvp_fast"


def _isa_flags() -> tuple[str, list[str]]:
    """Instruction-set flags for the CPU torch itself dispatches to (never -march=native),
    and a tag for the cache key, so a cache shared between machines never serves a binary
    built for a larger instruction set."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":  # the subset torch itself requires for its AVX512 kernels
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                          "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "base", []


def build_settings(src: Path, cache: Path | None = None) -> tuple[list[Path], list[str], list[str], Path]:
    """(sources, cflags, ldflags, build directory under `cache`, default cache_root()) for `src`.

    The build directory is named by a digest of what the binary depends on: the sources'
    names and contents, torch's version and build, the Python ABI, the instruction set and
    the compiler flags. Never a path: a checkout and an installed copy share one build.
    """
    isa, isa_flags = _isa_flags()
    # -fopenmp: at::parallel_for is inline OpenMP code. -fno-trapping-math changes no result (we
    # never unmask FP exceptions) but lets GCC turn clamps into selects, without which the
    # kernels' loops do not vectorise.
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math", "-DNDEBUG", *isa_flags]
    ldflags = ["-fopenmp"]  # links libgomp.so.1, the one torch already loaded
    paths = [src / name for name in _SOURCES if (src / name).exists()]
    digest = hashlib.sha256()
    for part in (torch.__version__, torch.version.git_version or "", sysconfig.get_config_var("SOABI") or sys.version,
                 isa, *cflags, *ldflags):
        digest.update(part.encode() + b"\0")
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"torch{torch.__version__.replace('+', '_')}-{isa}-{digest.hexdigest()[:16]}"
    return paths, cflags, ldflags, (cache or cache_root()) / "cpp" / tag


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its CUDA_HOME notice (these kernels are CPU-only)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _toolchain_problem() -> str | None:
    """Why the extension cannot be compiled here, or None."""
    is_ninja_available = _cpp_extension().is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r}; set CXX to choose one)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _unavailable(reason: str) -> ImportError:
    warnings.warn(f"dvp_fast: the native CPU kernels are unavailable, using the PyTorch fallback: {reason}",
                  RuntimeWarning, stacklevel=3)
    return ImportError(reason)


def build_and_load(src: Path | None = None, name: str = _NAME, cache: Path | None = None) -> Path:
    """Build (once, under torch's per-directory build lock) and load the extension; its path.

    A finished build leaves a `built` marker naming the library, after which later processes
    load it directly, without a compiler or ninja. Raises ImportError with the reason (the
    compiler's output for a failed build) after one RuntimeWarning.
    """
    paths, cflags, ldflags, build_dir = build_settings(src or source_dir(), cache)
    marker = build_dir / "built"
    library = Path(marker.read_text()) if marker.exists() else None
    if library is not None and library.exists():
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            raise _unavailable(f"loading {library} failed ({exc}); delete {build_dir} to rebuild it") from exc
        return library
    problem = _toolchain_problem()
    if problem is not None:
        raise _unavailable(problem)
    load = _cpp_extension().load
    print(f"dvp_fast: building the native CPU kernels (one time, about 30 s on two idle cores) in {build_dir}",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        # load() holds a file lock on build_dir for the whole ninja run, so concurrent builders
        # take turns; the second finds everything up to date.
        library = Path(load(name=name, sources=[str(p) for p in paths if p.suffix == ".cpp"], extra_cflags=cflags,
                            extra_ldflags=ldflags, build_directory=str(build_dir), is_python_module=False,
                            verbose=False))
        temp = build_dir / f"built.{os.getpid()}"
        temp.write_text(str(library))
        os.replace(temp, marker)  # atomic: a reader never sees a half-written marker
    except (RuntimeError, OSError, ImportError) as exc:  # a build error carries ninja's and the compiler's output
        raise _unavailable(f"building the C++ kernels in {build_dir} failed:\n{exc}") from exc
    print(f"dvp_fast: built the native CPU kernels in {time.perf_counter() - started:.1f} s", file=sys.stderr,
          flush=True)
    return library



# Memoised in plain globals: one build (or one warning) per process.
_LIBRARY: Path | None = None
_FAILURE: ImportError | None = None


def load_library() -> Path:
    """The library, built if needed and loaded into torch.ops.dvp_fast_cpp on the first call; cached after.

    Raises ImportError (after one RuntimeWarning, on the first call only) when it cannot be built or loaded.
    """
    global _LIBRARY, _FAILURE
    if _LIBRARY is None:
        if _FAILURE is not None:
            raise _FAILURE
        try:
            _LIBRARY = build_and_load()
        except ImportError as exc:
            _FAILURE = exc
            raise
    return _LIBRARY
