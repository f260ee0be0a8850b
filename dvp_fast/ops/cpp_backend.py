"""The "cpp" backend: native CPU kernels from csrc/, built just in time with ninja.

Importing this module builds the extension once per (source contents, torch version,
Python ABI, CPU instruction set and flags) into ``$DVP_FAST_CACHE`` (default
``~/.cache/dvp_fast``) and registers its ops; where the package or torch is installed is no
part of the key, so an editable checkout and an installed copy share one build. Without a
C++ compiler or ninja, or when the build fails, it warns once and raises ImportError, so
``backend="auto"`` falls back to torch and an explicit ``backend="cpp"`` raises the reason
(with the compiler's message).

Each op has two layers:
  * a torch operator ``torch.ops.dvp_fast_cpp.<name>`` (csrc/bindings.cpp) with a
    shape-only fake here, so torch.compile can trace through it;
  * a torch.autograd.Function that prepares arguments (contiguous, float32 or
    bfloat16, the cached DCT basis, the noise drawn from torch's generator) and
    calls the forward and backward operators; with no gradient needed the operator
    is called directly.
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

from ._backend import register
from .dct import dct_basis

_NAME = "dvp_fast_cpp"
_SOURCES = ("common.h", "dct.cpp", "gaussian_kl.cpp", "dml.cpp", "conv1x1.cpp", "bindings.cpp")
# Kernels exist for these storage dtypes; others are computed in float32 and cast back.
_NATIVE = (torch.float32, torch.bfloat16)


# ------------------------------------------------------------------------------------------ build
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


LIBRARY = build_and_load()
_ops = torch.ops.dvp_fast_cpp


# ------------------------------------------------------------------------- fakes (torch.compile)
def _empty(ref: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    return ref.new_empty(shape, dtype=dtype or ref.dtype)


@torch.library.register_fake(f"{_NAME}::dct_crop")
def _(x, scale, basis):
    shape = (x.shape[0], x.shape[1], basis.shape[0], basis.shape[0])
    return _empty(x, shape), _empty(x, shape, torch.float32)


@torch.library.register_fake(f"{_NAME}::dct_crop_backward")
def _(grad_y, ratio, scale, basis, need_x, need_scale, x_dtype):
    b, c, d, _ = ratio.shape
    return (_empty(ratio, (b if need_x else 0, c, basis.shape[1], basis.shape[1]), x_dtype),
            _empty(ratio, (c, d, d) if need_scale else (0,)))


@torch.library.register_fake(f"{_NAME}::idct_pad")
def _(u, scale, basis, size, need_mask):
    b, c = u.shape[:2]
    return _empty(u, (b, c, size, size)), _empty(u, (b if need_mask else 0, c, size, size), torch.bool)


@torch.library.register_fake(f"{_NAME}::idct_pad_backward")
def _(grad_out, mask, u, scale, basis, need_u, need_scale):
    b, c, d, _ = u.shape
    return _empty(u, (b if need_u else 0, c, d, d)), _empty(u, (c, d, d) if need_scale else (0,), torch.float32)


@torch.library.register_fake(f"{_NAME}::gaussian_kl")
def _(mu_q, logvar_q, mu_p, logvar_p, noise):
    return [torch.empty_like(m) for m in mu_q], _empty(mu_q[0], (mu_q[0].shape[0], len(mu_q)), torch.float32)


@torch.library.register_fake(f"{_NAME}::gaussian_kl_backward")
def _(grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, noise, need):
    return [(torch.empty_like(noise[l]) if which == 4 else torch.empty_like(mu_q[l])) if need & (1 << which)
            else _empty(noise[l], (0,)) for which in range(5) for l in range(len(mu_q))]


@torch.library.register_fake(f"{_NAME}::dml_log_prob")
def _(x, params, num_mix, need_params, need_x):
    return (_empty(x, (x.shape[0],), torch.float32), _empty(params, params.shape if need_params else (0,), torch.float32),
            _empty(x, x.shape if need_x else (0,), torch.float32))


@torch.library.register_fake(f"{_NAME}::scale_rows")
def _(grad_out, g, dtype):
    return _empty(g, g.shape, dtype)


@torch.library.register_fake(f"{_NAME}::dml_sample")
def _(params, u_mix, u_logistic, temperature, num_mix):
    return _empty(params, (params.shape[0], 3, params.shape[2], params.shape[3]), torch.float32)


@torch.library.register_fake(f"{_NAME}::conv1x1")
def _(x, weight, silu):
    return _empty(x, (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@torch.library.register_fake(f"{_NAME}::conv1x1_backward")
def _(grad_y, x, weight, silu, need_x, need_weight):
    return _empty(x, x.shape if need_x else (0,)), _empty(weight, weight.shape if need_weight else (0,))


# ------------------------------------------------------------------------------------- helpers
def _native(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor of a dtype the kernels take (float16/float64 go through float32)."""
    return (t if t.dtype in _NATIVE else t.float()).contiguous()


def _output(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, as an autograd.Function's output: a copy while torch.compile traces, because
    torch 2.11's dynamo gave a zero gradient for an output that is the custom op's own result."""
    return t.to(dtype, copy=torch.compiler.is_compiling())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------- DCT
class _DctCrop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, basis):
        xk = _native(x)
        scale32 = scale.float().contiguous()
        y, ratio = _ops.dct_crop(xk, scale32, basis)
        ctx.save_for_backward(ratio, scale32, basis)
        ctx.dtypes = (x.dtype, xk.dtype, scale.dtype)
        return _output(y, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        ratio, scale32, basis = ctx.saved_tensors
        x_dtype, k_dtype, scale_dtype = ctx.dtypes
        need_x, need_scale = ctx.needs_input_grad[:2]
        gx, gs = _ops.dct_crop_backward(grad_y.to(k_dtype).contiguous(), ratio, scale32, basis, need_x, need_scale,
                                        k_dtype)
        return (gx.to(x_dtype) if need_x else None), (gs.to(scale_dtype) if need_scale else None), None


@register("dct_crop", "cpp")
def dct_crop_cpp(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    basis = dct_basis(scale.shape[-1], x.shape[-1])
    if _needs_grad(x, scale):
        return _DctCrop.apply(x, scale, basis)
    return _ops.dct_crop(_native(x), scale.float().contiguous(), basis)[0].to(x.dtype)


class _IdctPad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, scale, basis, size):
        uk = _native(u)
        scale32 = scale.float().contiguous()
        out, mask = _ops.idct_pad(uk, scale32, basis, size, True)
        ctx.save_for_backward(mask, uk, scale32, basis)
        ctx.dtypes = (u.dtype, scale.dtype)
        return _output(out, u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        mask, uk, scale32, basis = ctx.saved_tensors
        u_dtype, scale_dtype = ctx.dtypes
        need_u, need_scale = ctx.needs_input_grad[:2]
        gu, gs = _ops.idct_pad_backward(grad_out.to(uk.dtype).contiguous(), mask, uk, scale32, basis, need_u,
                                        need_scale)
        return (gu.to(u_dtype) if need_u else None), (gs.to(scale_dtype) if need_scale else None), None, None


@register("idct_pad", "cpp")
def idct_pad_cpp(u: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    basis = dct_basis(u.shape[-1], size)
    if _needs_grad(u, scale):
        return _IdctPad.apply(u, scale, basis, size)
    return _ops.idct_pad(_native(u), scale.float().contiguous(), basis, size, False)[0].to(u.dtype)


# ------------------------------------------------------------------------------------ Gaussian KL
def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _draw_noise(mu_q: torch.Tensor) -> torch.Tensor:
    """The fallback's draw exactly: torch's generator (manual_seed reproduces it), float32, mu_q's layout."""
    return torch.randn_like(mu_q, dtype=torch.float32)


def _layer_inputs(mu_q, logvar_q, mu_p, logvar_p, noise):
    """One layer's kernel inputs: the four contiguous in one native dtype, noise contiguous float32."""
    four = (mu_q, logvar_q, mu_p, logvar_p)
    dtype = mu_q.dtype
    if dtype not in _NATIVE or any(t.dtype != dtype for t in four):
        dtype = torch.float32
    return [_to(t, dtype).contiguous() for t in four] + [_to(noise, torch.float32).contiguous()]


def _need_mask(needs) -> int:
    """Bit w set when any tensor of input group w (mu_q, logvar_q, mu_p, logvar_p, noise) needs a gradient."""
    per_group = len(needs) // 5
    return sum(1 << w for w in range(5) if any(needs[w * per_group:(w + 1) * per_group]))


class _GaussianSampleKL(torch.autograd.Function):
    """One layer: (mu_q, logvar_q, mu_p, logvar_p, noise) -> (z, kl (B,)). Backward reads the saved noise."""

    @staticmethod
    def forward(ctx, mu_q, logvar_q, mu_p, logvar_p, noise):
        inputs = _layer_inputs(mu_q, logvar_q, mu_p, logvar_p, noise)
        (z,), kl = _ops.gaussian_kl(*[[t] for t in inputs])
        ctx.save_for_backward(*inputs)
        ctx.dtypes = (mu_q.dtype, logvar_q.dtype, mu_p.dtype, logvar_p.dtype, noise.dtype)
        ctx.set_materialize_grads(False)
        return _to(z, mu_q.dtype), kl.view(-1)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        saved = ctx.saved_tensors
        if grad_kl is None:
            grad_kl = torch.zeros(saved[0].shape[0])
        needs = ctx.needs_input_grad
        grads = _ops.gaussian_kl_backward([grad_z], grad_kl.reshape(-1, 1), *[[t] for t in saved], _need_mask(needs))
        return tuple(_to(g, dtype) if need else None for g, dtype, need in zip(grads, ctx.dtypes, needs))


class _GaussianKLGrouped(torch.autograd.Function):
    """inputs: num_layers, then mu_q[L], logvar_q[L], mu_p[L], logvar_p[L], noise[L]; outputs: z[L], kl (B, L)."""

    @staticmethod
    def forward(ctx, num_layers, *flat):
        layers = [_layer_inputs(*flat[l::num_layers]) for l in range(num_layers)]
        groups = [[layer[i] for layer in layers] for i in range(5)]
        zs, kl = _ops.gaussian_kl(*groups)
        ctx.save_for_backward(*[t for group in groups for t in group])
        ctx.num_layers = num_layers
        ctx.dtypes = [t.dtype for t in flat]
        ctx.set_materialize_grads(False)
        return (*[_to(z, flat[l].dtype) for l, z in enumerate(zs)], kl)

    @staticmethod
    def backward(ctx, *grads):
        L, saved = ctx.num_layers, ctx.saved_tensors
        groups = [list(saved[i * L:(i + 1) * L]) for i in range(5)]
        grad_kl = grads[L] if grads[L] is not None else torch.zeros(saved[0].shape[0], L)
        needs = ctx.needs_input_grad[1:]
        out = _ops.gaussian_kl_backward(list(grads[:L]), grad_kl, *groups, _need_mask(needs))
        return (None, *[_to(out[i], ctx.dtypes[i]) if needs[i] else None for i in range(5 * L)])


@register("gaussian_sample_kl", "cpp")
def gaussian_sample_kl_cpp(mu_q, logvar_q, mu_p, logvar_p, noise=None):
    if noise is None:
        noise = _draw_noise(mu_q)
    if _needs_grad(mu_q, logvar_q, mu_p, logvar_p, noise):
        return _GaussianSampleKL.apply(mu_q, logvar_q, mu_p, logvar_p, noise)
    (z,), kl = _ops.gaussian_kl(*[[t] for t in _layer_inputs(mu_q, logvar_q, mu_p, logvar_p, noise)])
    return _to(z, mu_q.dtype), kl.view(-1)


@register("gaussian_sample_kl_grouped", "cpp")
def gaussian_sample_kl_grouped_cpp(layers):
    noises = [_draw_noise(layer[0]) for layer in layers]  # in layer order, as the fallback draws them
    flat = [layer[i] for i in range(4) for layer in layers] + noises
    if _needs_grad(*flat):
        *zs, kl = _GaussianKLGrouped.apply(len(layers), *flat)
        return zs, kl
    inputs = [_layer_inputs(*layer, noise) for layer, noise in zip(layers, noises)]
    zs, kl = _ops.gaussian_kl(*[[layer[i] for layer in inputs] for i in range(5)])
    return [_to(z, layer[0].dtype) for z, layer in zip(zs, layers)], kl


# -------------------------------------------------------------------------- mixture of logistics
class _DmlLogProb(torch.autograd.Function):
    """The forward kernel also writes d log p / d params (and d x); backward only scales them."""

    @staticmethod
    def forward(ctx, x, params, num_mix):
        need_x, need_params = ctx.needs_input_grad[:2]
        logp, g_params, g_x = _ops.dml_log_prob(x, _native(params), num_mix, need_params, need_x)
        ctx.save_for_backward(g_params, g_x)
        ctx.dtypes = (x.dtype, params.dtype)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        g_params, g_x = ctx.saved_tensors
        (x_dtype, p_dtype), (need_x, need_params) = ctx.dtypes, ctx.needs_input_grad[:2]
        scaled = lambda g, dtype: _ops.scale_rows(grad_logp, g, dtype if dtype in _NATIVE else torch.float32).to(dtype)
        return (scaled(g_x, x_dtype) if need_x else None), (scaled(g_params, p_dtype) if need_params else None), None


@register("dml_log_prob", "cpp")
def dml_log_prob_cpp(x: torch.Tensor, params: torch.Tensor, num_mix: int) -> torch.Tensor:
    if _needs_grad(x, params):
        return _DmlLogProb.apply(x, params, num_mix)
    return _ops.dml_log_prob(x, _native(params), num_mix, False, False)[0]


@register("dml_sample", "cpp")
def dml_sample_cpp(params: torch.Tensor, temperature: float, num_mix: int) -> torch.Tensor:
    b, _, h, w = params.shape
    # The fallback's draws, in its order: a uniform per component (none at temperature 0, where the
    # kernel takes the largest logit and reads no u_mix), then one per colour.
    u_mix = params[:, :num_mix].to(torch.float32)
    u_mix = torch.rand_like(u_mix) if temperature > 0 else torch.empty_like(u_mix)
    u_logistic = torch.rand_like(params.new_empty((b, 3, h, w), dtype=torch.float32))
    return _ops.dml_sample(_native(params), u_mix.contiguous(), u_logistic, float(temperature), num_mix)


# ------------------------------------------------------------------------------ 1x1 convolution
def _weight_with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(Cout, Cin + 1) float32: the kernel takes the bias as the weight's last column."""
    w = weight.reshape(weight.shape[0], weight.shape[1]).float()
    b = bias.float() if bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], dim=1).contiguous()


class _Conv1x1(torch.autograd.Function):
    """Saves x, not act(x): backward recomputes the SiLU inside the kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        xk, wb = _native(x), _weight_with_bias(weight, bias)
        ctx.save_for_backward(xk, wb)
        ctx.silu, ctx.dtypes = silu, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _to(_ops.conv1x1(xk, wb, silu), x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        xk, wb = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gx, gwb = _ops.conv1x1_backward(_to(grad_y, xk.dtype).contiguous(), xk, wb, ctx.silu, need_x,
                                        need_w or need_b)
        cin = xk.shape[1]
        gw = _to(gwb[:, :cin], w_dtype).reshape(gwb.shape[0], cin, 1, 1) if need_w else None
        gb = _to(gwb[:, cin], b_dtype) if need_b else None
        return (_to(gx, x_dtype) if need_x else None), gw, gb, None


@register("conv1x1", "cpp")
def conv1x1_cpp(x, weight, bias, silu):
    if _needs_grad(x, weight, bias):
        return _Conv1x1.apply(x, weight, bias, silu)
    return _to(_ops.conv1x1(_native(x), _weight_with_bias(weight, bias), silu), x.dtype)
