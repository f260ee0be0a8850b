"""Shared machinery of the benchmark sections: clocks, statistics, memory, rows, the run record.

Conventions every section follows (bench/results/README.md repeats them for readers):
  * Times: each variant of a case runs in turn within every repeat (interleaved), so load on a
    shared machine hits all variants alike. On CUDA a repeat is timed with CUDA events after a
    device synchronise and an L2 flush, so launch overhead counts; on CPU with perf_counter.
    A row reports the median over repeats and the inter-quartile range (IQR) as its spread.
  * Ratios are always against a baseline measured in the same run and the same interleaving.
  * Peak memory: on CUDA torch.cuda.max_memory_allocated during the call minus what was
    allocated before it; on CPU the peak of the process RSS (sampled every 0.5 ms by a thread)
    minus the RSS before the call, with glibc's free heap pages released first (malloc_trim)
    and its mmap threshold at 128 KiB during the call, so that every tensor the call allocates
    shows up as RSS growth. One untimed call per variant.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the run's settings -------------------------------------------------------------------------------
@dataclass
class Settings:
    """What a section needs to know about the run: device, size class, repeat policy."""

    device: torch.device
    quick: bool
    warmup: int  # untimed calls per variant before the repeats
    repeats: int  # timed calls per variant (at most)
    min_repeats: int  # ... and at least this many, whatever the time budget
    budget_s: float  # a case stops repeating once this much wall time is spent on it
    notes: list[str] = field(default_factory=list)  # run-wide notes collected by sections
    presets: tuple[str, ...] | None = None  # --presets: only these, in this order (None: every preset)
    paper_batch: bool = False  # --paper-batch: model.train at each preset's own batch size only
    compile: bool = True  # --no-compile: no torch.compile (inductor) variants; CUDA graph capture stays

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def chosen(self, items, preset_of=lambda item: item) -> list:
        """`items` (presets, or settings whose preset `preset_of` gives) kept and ordered by --presets."""
        items = list(items)
        if self.presets is None:
            return items
        return [item for p in self.presets for item in items if preset_of(item) == p]

    @classmethod
    def make(cls, device: str, quick: bool) -> "Settings":
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if quick:
            return cls(dev, True, warmup=1, repeats=3, min_repeats=2, budget_s=2.0)
        if dev.type == "cuda":
            return cls(dev, False, warmup=5, repeats=50, min_repeats=10, budget_s=20.0)
        return cls(dev, False, warmup=1, repeats=9, min_repeats=3, budget_s=8.0)


# --quick on CPU shrinks cifar10's width too: at full width one training step takes seconds even at batch 2
QUICK_OVERRIDES = {"cifar10": {"num_ch": 32}}


def quick_overrides(preset: str, st: Settings) -> tuple[dict, str]:
    """(model overrides, label) of the reduced-width presets of --quick on CPU; ({}, "") otherwise."""
    if st.quick and not st.cuda and preset in QUICK_OVERRIDES:
        from dvp_fast.config import model_preset

        kw, full = QUICK_OVERRIDES[preset], model_preset(preset)
        return kw, "reduced: " + ", ".join(f"{k} {v} (preset {getattr(full, k)})" for k, v in kw.items())
    return {}, ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- clocks ----------------------------------------------------------------------------------------------
class _L2Flush:
    """A 256 MiB buffer written before every timed CUDA call, as triton.testing.do_bench does."""

    _buf: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def run(cls, device: torch.device) -> None:
        buf = cls._buf.get(device)
        if buf is None:
            buf = cls._buf[device] = torch.empty(256 * 2 ** 20 // 4, dtype=torch.int32, device=device)
        buf.zero_()


def release_flush_buffer() -> None:
    _L2Flush._buf.clear()


def time_call(fn: Callable, device: torch.device, setup: Callable | None = None) -> float:
    """Seconds taken by fn(setup()) (setup untimed). CUDA: events around the call on an idle device."""
    state = setup() if setup is not None else None
    if device.type == "cuda":
        _L2Flush.run(device)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(state)
    return time.perf_counter() - t0


@dataclass
class Timing:
    """Repeated measurements of one variant, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1_q3(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr(self) -> float:
        q1, q3 = self.q1_q3
        return q3 - q1


def time_variants(variants: dict[str, tuple[Callable, Callable | None]], st: Settings,
                  warmup: int | None = None, repeats: int | None = None, min_repeats: int | None = None,
                  budget_s: float | None = None) -> dict[str, Timing]:
    """Interleaved timing: every repeat runs every variant once, in turn.

    variants: name -> (fn, setup) as for `time_call`. Stops after `repeats` rounds, or
    earlier once `budget_s` is spent, but never before `min_repeats` rounds.
    """
    warmup = st.warmup if warmup is None else warmup
    repeats = st.repeats if repeats is None else repeats
    min_repeats = min(repeats, st.min_repeats if min_repeats is None else min_repeats)
    budget_s = st.budget_s if budget_s is None else budget_s
    for _ in range(warmup):
        for fn, setup in variants.values():
            time_call(fn, st.device, setup)
    out = {name: [] for name in variants}
    t0 = time.perf_counter()
    for rep in range(repeats):
        for name, (fn, setup) in variants.items():
            out[name].append(time_call(fn, st.device, setup))
        if rep + 1 >= min_repeats and time.perf_counter() - t0 > budget_s:
            break
    return {name: Timing(v) for name, v in out.items()}


# --- memory ----------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt  # noqa: B018  glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _libc()
    if not libc:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        trim_threshold))


def steady_malloc() -> str:
    """Fix glibc's malloc thresholds for the whole run (32 MiB mmap, 64 MiB trim: its steady state).

    glibc raises its mmap threshold dynamically as large blocks are freed; fixing it at the
    value it settles at keeps CPU timings comparable from the first row to the last, and lets
    `peak_memory` switch it temporarily without changing the conditions of later timings.
    """
    if _mallopt(32 * 2 ** 20, 64 * 2 ** 20):
        return "glibc malloc: mmap threshold fixed at 32 MiB, trim threshold 64 MiB"
    return "malloc thresholds left at their defaults (not glibc)"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _RSSPeak:
    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()

        def watch():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


CPU_MEM_METHOD = "CPU: peak RSS delta over the call (sampled every 0.5 ms; glibc heap trimmed first, mmap threshold 128 KiB)"
CUDA_MEM_METHOD = "CUDA: torch.cuda.max_memory_allocated minus allocated before the call"


def memory_method(device: torch.device) -> str | None:
    if device.type == "cuda":
        return CUDA_MEM_METHOD
    if device.type == "cpu" and os.path.exists("/proc/self/statm") and _libc():
        return CPU_MEM_METHOD
    return None


def peak_memory(fn: Callable, device: torch.device, setup: Callable | None = None) -> float | None:
    """Peak extra memory of fn(setup()) in MiB (see `memory_method`), or None where not measurable."""
    method = memory_method(device)
    if method is None:
        return None
    state = setup() if setup is not None else None
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(state)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    _mallopt(128 * 1024, 128 * 1024)
    _libc().malloc_trim(0)  # free heap pages leave RSS, so reusing them shows up as growth
    try:
        with _RSSPeak() as watch:
            fn(state)
        return (watch.peak - watch.base) / 2 ** 20
    finally:
        _mallopt(32 * 2 ** 20, 64 * 2 ** 20)


# --- bandwidth ---------------------------------------------------------------------------------------
def copy_bandwidth(st: Settings) -> dict:
    """The device's measured copy bandwidth: dst.copy_(src) of a large float32 tensor, read + write bytes."""
    mib = 64 if st.quick else (1024 if st.cuda else 256)
    n = mib * 2 ** 20 // 4
    src = torch.randn(n, device=st.device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults on CPU
    timings = time_variants({"copy": (lambda _: dst.copy_(src), None)}, st, warmup=2,
                            repeats=10 if st.quick else 30, min_repeats=5, budget_s=10.0)["copy"]
    gbps = [2 * n * 4 / s / 1e9 for s in timings.samples]
    q1, q3 = Timing(gbps).q1_q3
    return dict(size_mib=mib, median_gbps=statistics.median(gbps), iqr_gbps=q3 - q1, n=len(gbps),
                method=f"dst.copy_(src) of {mib} MiB float32, bytes = read + write")


# --- which backends --------------------------------------------------------------------------------------
def timed_backends(device: torch.device) -> tuple[list[str], list[str]]:
    """Kernel backends to time on `device` (torch first) and notes on those left out, and why."""
    from dvp_fast.ops import _backend

    names, notes = ["torch"], []
    for name, wanted in (("cpp", "cpu"), ("triton", "cuda")):
        ok, why = _backend.availability(name)
        if not ok:
            notes.append(f"backend {name} not available: {why}")
        elif device.type != wanted:
            notes.append(f"backend {name} not timed on {device.type} (it runs on {wanted} tensors"
                         + ("; Triton's CPU interpreter is a test tool, not a performance path)"
                            if name == "triton" else ")"))
        else:
            names.append(name)
    return names, notes


@contextlib.contextmanager
def force_torch_backend():
    """Inside: every op called with backend="auto" resolves to the pure-PyTorch fallback.

    Patches the one dispatch point (`dvp_fast.ops._backend._usable`, which "auto" consults);
    explicit backends are untouched. This is how the eager reference path is benchmarked
    until dvp_fast grows a global switch.
    """
    from dvp_fast.ops import _backend

    original = _backend._usable
    _backend._usable = lambda op, backend: False
    try:
        yield
    finally:
        _backend._usable = original


@contextlib.contextmanager
def record_dispatch():
    """Records which (op, backend) implementations run inside; yields the set, filled as they run."""
    from dvp_fast.ops import _backend

    seen: set[tuple[str, str]] = set()
    for backend in ("torch", "cpp", "triton"):  # load them all first: only loaded implementations can be wrapped
        _backend.availability(backend)
    saved = {op: dict(impls) for op, impls in _backend._REGISTRY.items()}

    def wrap(op, backend, fn):
        def recorded(*args, **kwargs):
            seen.add((op, backend))
            return fn(*args, **kwargs)

        return recorded

    for op, impls in _backend._REGISTRY.items():
        for backend, fn in impls.items():
            impls[backend] = wrap(op, backend, fn)
    try:
        yield seen
    finally:
        for op, impls in saved.items():
            _backend._REGISTRY[op].update(impls)  # put back exactly what was wrapped


def describe_dispatch(seen: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{op}:{backend}" for op, backend in sorted(seen)) or "no dvp_fast op"


# --- rows ------------------------------------------------------------------------------------------------
def row(section: str, group: str, case: str, variant: str, metric: str, unit: str, *, value: float,
        spread: float | None = None, n: int | None = None, passname: str = "", baseline: str | None = None,
        ratio: float | None = None, ratio_kind: str | None = None, note: str = "", **extra) -> dict:
    """One result. `value` is a median where `n` > 1, `spread` its IQR (same unit)."""
    r = dict(section=section, group=group, case=case, variant=variant, metric=metric, passname=passname,
             value=value, spread=spread, spread_kind="IQR" if spread is not None else None, n=n, unit=unit,
             baseline=baseline, ratio=ratio, ratio_kind=ratio_kind, note=note)
    r.update(extra)
    return r


def timing_row(section, group, case, variant, timing: Timing, *, passname="", unit="ms", **kw) -> dict:
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    return row(section, group, case, variant, "time", unit, value=timing.median * scale,
               spread=timing.iqr * scale, n=len(timing.samples), passname=passname, **kw)


def add_speedups(rows: list[dict], baseline: str, key=("section", "group", "case", "passname", "metric")) -> None:
    """Fill ratio = baseline median / this median for time rows, this / baseline for rates."""
    index = {tuple(r[k] for k in key): r for r in rows if r["variant"] == baseline}
    for r in rows:
        base = index.get(tuple(r[k] for k in key))
        if base is None or r is base or not base["value"] or not r["value"]:
            continue
        r["baseline"] = baseline
        if r["metric"] == "time":
            r["ratio"], r["ratio_kind"] = base["value"] / r["value"], f"speed-up over {baseline}"
        elif r["metric"] == "throughput":
            r["ratio"], r["ratio_kind"] = r["value"] / base["value"], f"speed-up over {baseline}"
        else:
            r["ratio"], r["ratio_kind"] = r["value"] / base["value"], f"x {baseline}"


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()  # trainers hold reference cycles (EMA copies, closures): free them before measuring the next
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(st: Settings, section: str, group: str, case: str, make_rows: Callable[[], list[dict]],
            variant: str = "") -> list[dict]:
    """make_rows(), or one "failed" row (value NaN, the reason in its note and in the run's notes).

    A long run on a device nobody has tried yet should not die at minute 15 for one case: the
    failure is recorded where the numbers would have been, and the traceback goes to stderr.
    """
    try:
        return make_rows()
    except Exception as exc:  # noqa: BLE001  recorded, not hidden
        reason = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        traceback.print_exc()
        st.notes.append(f"{section}.{group} [{case}{' ' + variant if variant else ''}] failed: {reason}")
        free_memory(st.device)
        return [row(section, group, case, variant, "failed", "", value=math.nan, note=f"failed: {reason}")]


# --- the run record --------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(st: Settings) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001  absent or broken: recorded as such
        triton_version = None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = dict(
        device=str(st.device), device_name=device_name(st.device), quick=st.quick,
        date=datetime.date.today().isoformat(), time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        torch=torch.__version__, triton=triton_version, python=platform.python_version(),
        git_commit=_git("rev-parse", "HEAD") or None, git_dirty=bool(dirty), git_dirty_files=dirty.splitlines(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), platform=platform.platform(),
        command=" ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv else "bench/run.py", *sys.argv[1:]]),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    if st.cuda:
        props = torch.cuda.get_device_properties(st.device)
        env.update(cuda=torch.version.cuda, gpu_memory_gib=props.total_memory / 2 ** 30,
                   compute_capability=f"{props.major}.{props.minor}")
    return env
