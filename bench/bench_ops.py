"""Ops section: every public op x every backend that runs here, forward, backward and both.

Variants of each case:
  * "torch"          the pure-PyTorch fallback (the reference, and the baseline of every ratio);
  * "cpp" / "triton" whichever of the fused backends `backend_available` reports and that run on
                     this device (cpp on CPU tensors, triton on CUDA tensors);
  * "torch.compile"  torch.compile(fallback, dynamic=False); its first call (compilation) is
                     reported on its own row, never mixed into the steady-state time;
  * "authors"        for dct_crop / idct_pad only: the reference code's approach, the full D x D
                     DCT as two einsums then a crop, and zero-padding then the full inverse.
Passes: "fwd" the forward with autograd recording (inputs require grad, as in training),
"bwd" the backward alone (its forward runs untimed), "fwd+bwd" both. dml_sample has one pass,
"sample". The "dct_pair" group times what one training step does with the DCT ops
(dct_crop forward without grad, then idct_pad forward and backward) against the authors'.

Shapes: each preset at its training batch size (cifar10 128, mnist and omniglot 250); the KL
cases use all L latent layers of the preset (omniglot's are mnist's, so it has no KL rows of its own), once as L calls of gaussian_sample_kl (what
model.py does) and once as one gaussian_sample_kl_grouped call. --quick uses batch 8.

GB/s counts the compulsory traffic of each pass (inputs read once, outputs written once,
float32) divided by the median time, and is also given as a percentage of the copy bandwidth
measured in the same run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from dvp_fast import ops
from dvp_fast.config import model_preset
from dvp_fast.ops._backend import implementation, implements
from dvp_fast.ops.dct import dct_basis, dct_scale_bound

try:
    from . import common
    from .common import Settings
except ImportError:  # run as a script from bench/
    import common
    from common import Settings

SECTION = "ops"
PASSES = ("fwd", "bwd", "fwd+bwd")
TRAIN_BATCH = {"mnist": 250, "omniglot": 250, "cifar10": 128}
F32 = 4


# --- the authors' DCT (SPEC §4): full transform, then crop; zero-pad, then full inverse --------------------
def dct_crop_authors(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clamp(crop_d(A X A^T) / S, -1, 1) with the full D x D basis, as two einsums.

    Leaves out the reference's data-dependent `if x.min() < 0` (a host sync), which would
    only make this baseline slower.
    """
    d, size = scale.shape[-1], x.shape[-1]
    basis = dct_basis(size, size, device=x.device)
    x01 = (x + 1.0) * 0.5
    rows = torch.einsum("bchw,kw->bchk", x01, basis)
    full = torch.einsum("bchk,jh->bcjk", rows, basis)
    return (full[..., :d, :d] / scale).clamp(-1.0, 1.0)


def idct_pad_authors(u: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """2 clamp(A^T pad_D(u S) A, 0, 1) - 1 with the full D x D basis, as two einsums."""
    d = u.shape[-1]
    basis = dct_basis(size, size, device=u.device)
    padded = torch.nn.functional.pad(u * scale, (0, size - d, 0, size - d))
    rows = torch.einsum("bcjk,kw->bcjw", padded, basis)
    image01 = torch.einsum("bcjw,jh->bchw", rows, basis)
    return 2.0 * image01.clamp(0.0, 1.0) - 1.0


# --- cases -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One op at one shape. `call(impl, leaves)` runs it; `bytes` maps a pass to its compulsory traffic."""

    group: str  # the op (or "dct_pair")
    name: str  # shape description
    inputs: list[torch.Tensor]  # differentiable inputs (cloned into fresh leaves per call)
    call: Callable  # (impl, leaves) -> list of outputs
    impls: dict[str, Callable]  # variant -> implementation handed to `call`
    bytes: dict[str, int]
    passes: tuple[str, ...] = PASSES
    baseline: str = "torch"


PUBLIC = {"dct_crop": ops.dct_crop, "idct_pad": ops.idct_pad, "gaussian_sample_kl": ops.gaussian_sample_kl,
          "gaussian_sample_kl_grouped": ops.gaussian_sample_kl_grouped, "dml_log_prob": ops.dml_log_prob,
          "dml_sample": ops.dml_sample, "conv1x1": ops.conv1x1}


def _op_impls(op: str, backends: list[str], compiled: bool, extra: dict | None = None) -> dict[str, Callable]:
    """The backends that implement `op`, through the public op (argument checks and dispatch included, as
    users call it); torch.compile wraps the fallback implementation itself."""
    impls = {b: functools.partial(PUBLIC[op], backend=b) for b in backends if implements(op, b)}
    if compiled:
        impls["torch.compile"] = torch.compile(implementation(op, "torch"), dynamic=False)
    impls.update(extra or {})
    return impls


def _latent_shapes(preset: str) -> list[tuple[int, int, int]]:
    """(C, r, r) of z_L .. z_1 for the preset."""
    cfg = model_preset(preset)
    res = cfg.scale_resolutions()  # bottom-up
    shapes = []
    for i in reversed(range(len(cfg.latent_scales))):
        shapes += [(cfg.latent_width, res[i], res[i])] * cfg.latent_scales[i]
    return shapes


def make_cases(preset: str, batch: int, device: torch.device, backends: list[str],
               compile_groups: set[str]) -> list[Case]:
    """Every case of one preset; "torch.compile" variants only for the groups in `compile_groups`."""
    cfg = model_preset(preset)
    gen = torch.Generator().manual_seed(0)
    c, size, d = cfg.image_channels, cfg.image_size, cfg.pseudoinput_size
    dev = lambda t: t.to(device)
    cases = []

    # DCT pair (SPEC §4); S bounded so y stays inside [-1, 1] for most coefficients
    x = dev(torch.rand(batch, c, size, size, generator=gen) * 2 - 1)
    scale = dev(dct_scale_bound(c, d, size) * 0.5)
    u = dev(torch.rand(batch, c, d, d, generator=gen) * 2 - 1)
    n_x, n_u = x.numel() * F32, u.numel() * F32
    cases.append(Case(
        "dct_crop", f"{preset}: ({batch},{c},{size},{size}) -> d={d}", [x],
        lambda impl, leaves: [impl(leaves[0], scale)],
        _op_impls("dct_crop", backends, "dct_crop" in compile_groups, {"authors": dct_crop_authors}),
        {"fwd": n_x + n_u, "bwd": 2 * n_u + n_x, "fwd+bwd": n_x + n_u + 2 * n_u + n_x}))
    cases.append(Case(
        "idct_pad", f"{preset}: ({batch},{c},{d},{d}) -> {size}", [u],
        lambda impl, leaves: [impl(leaves[0], scale, size)],
        _op_impls("idct_pad", backends, "idct_pad" in compile_groups, {"authors": idct_pad_authors}),
        {"fwd": n_u + n_x, "bwd": 2 * n_x + n_u, "fwd+bwd": n_u + n_x + 2 * n_x + n_u}))
    pair = {b: (functools.partial(ops.dct_crop, backend=b), functools.partial(ops.idct_pad, backend=b))
            for b in backends}
    if "dct_pair" in compile_groups:
        pair["torch.compile"] = (torch.compile(implementation("dct_crop", "torch"), dynamic=False),
                                 torch.compile(implementation("idct_pad", "torch"), dynamic=False))
    pair["authors"] = (dct_crop_authors, idct_pad_authors)

    def pair_call(impl, leaves):
        crop, pad = impl
        with torch.no_grad():  # the model takes no gradient through f(x)
            y = crop(x, scale)
        return [pad(y + leaves[0], scale, size)]  # u = f(x) + sigma eps, the leaf playing sigma eps

    cases.append(Case(
        "dct_pair", f"{preset}: dct_crop fwd (no grad) + idct_pad fwd+bwd, B={batch}", [u], pair_call, pair,
        {"fwd+bwd": (n_x + n_u) + (n_u + n_x + 2 * n_x + n_u)}, passes=("fwd+bwd",), baseline="authors"))

    # Gaussian KL over all L layers of the preset
    layers = [[dev(torch.randn(batch, *shape, generator=gen)) for _ in range(4)] for shape in _latent_shapes(preset)]
    n_elem = sum(t[0].numel() for t in layers)
    kl_bytes = {"fwd": 5 * n_elem * F32, "bwd": 9 * n_elem * F32, "fwd+bwd": 14 * n_elem * F32}
    flat = [t for layer in layers for t in layer]

    def per_layer(impl, leaves):
        out = []
        for i in range(0, len(leaves), 4):
            z, kl = impl(*leaves[i:i + 4], None)
            out += [z, kl]
        return out

    def grouped(impl, leaves):
        zs, kl = impl([tuple(leaves[i:i + 4]) for i in range(0, len(leaves), 4)])
        return [*zs, kl]

    n_layers = len(layers)
    cases.append(Case("gaussian_sample_kl", f"{preset}: {n_layers} layers as {n_layers} calls, B={batch}", flat,
                      per_layer, _op_impls("gaussian_sample_kl", backends, "gaussian_sample_kl" in compile_groups), kl_bytes))
    cases.append(Case("gaussian_sample_kl_grouped", f"{preset}: {n_layers} layers in one call, B={batch}", flat,
                      grouped, _op_impls("gaussian_sample_kl_grouped", backends, "gaussian_sample_kl_grouped" in compile_groups), kl_bytes))

    # 1x1 convolution of SiLU(x): the residual blocks' bottleneck entry, at the finest latent resolution
    ch, hidden, res = cfg.num_ch, max(1, int(cfg.num_ch * cfg.block_ch_mult)), cfg.scale_resolutions()[0]
    feats = dev(torch.randn(batch, ch, res, res, generator=gen))
    conv = [dev(torch.randn(hidden, ch, 1, 1, generator=gen) / ch ** 0.5), dev(torch.randn(hidden, generator=gen))]
    n_in, n_out = feats.numel() * F32, batch * hidden * res * res * F32
    cases.append(Case(
        "conv1x1", f"{preset}: SiLU then 1x1 conv ({batch},{ch},{res},{res}) -> {hidden}", [feats, *conv],
        lambda impl, leaves: [impl(*leaves, silu=True)],
        _op_impls("conv1x1", backends, "conv1x1" in compile_groups),
        # fwd reads x, writes y; bwd reads the gradient and x, writes d x
        {"fwd": n_in + n_out, "bwd": n_out + 2 * n_in, "fwd+bwd": 2 * n_out + 3 * n_in}))

    # Discretized mixture of logistics (cifar10 only: the others are Bernoulli)
    if cfg.likelihood == "dml":
        m = cfg.num_mix
        target = dev(torch.randint(0, 256, (batch, c, size, size), generator=gen).float() / 127.5 - 1.0)
        params = dev(torch.randn(batch, m * (3 * c + 1), size, size, generator=gen))
        n_p, n_t = params.numel() * F32, target.numel() * F32
        cases.append(Case(
            "dml_log_prob", f"{preset}: x ({batch},3,{size},{size}), params ({batch},{params.shape[1]},{size},{size})",
            [params], lambda impl, leaves: [impl(target, leaves[0], m)],
            _op_impls("dml_log_prob", backends, "dml_log_prob" in compile_groups, _dml_config_variants(backends)),
            # fwd reads params and x; bwd reads params and x again and writes d params; fused fwd+bwd needs
            # one read of params and x and one write of the gradient
            {"fwd": n_p + n_t, "bwd": 2 * n_p + n_t, "fwd+bwd": 2 * n_p + n_t}))
        cases.append(Case(
            "dml_sample", f"{preset}: params ({batch},{params.shape[1]},{size},{size})", [params],
            lambda impl, leaves: [impl(leaves[0], 1.0, m)],
            _op_impls("dml_sample", backends, "dml_sample" in compile_groups), {"sample": n_p + n_t}, passes=("sample",)))
    return cases


def _dml_config_variants(backends: list[str]) -> dict[str, Callable]:
    """The Triton DML kernel at its other launch configurations (kernels/dml.py CONFIGS), for a GPU
    measurement to choose the default from: rows "triton 32x4", "triton 64x8"..."""
    if "triton" not in backends:
        return {}
    from dvp_fast.kernels import dml as dml_kernels

    def at(name):
        def call(x, params, num_mix):
            with dml_kernels.use_config(name):
                return ops.dml_log_prob(x, params, num_mix, backend="triton")
        return call

    return {f"triton {name}": at(name) for name in dml_kernels.CONFIGS if name != dml_kernels.DEFAULT_CONFIG}


# --- timing ------------------------------------------------------------------------------------------------
def _leaves(inputs: list[torch.Tensor], grad: bool) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(grad) for t in inputs]


def _pass_fns(case: Case, impl: Callable, which: str, grads: list[torch.Tensor]):
    """(fn, setup) for one variant and pass; grads are the fixed upstream gradients."""
    def backward(outs):
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [g for o, g in zip(outs, grads) if o.requires_grad])

    if which == "sample":
        return (lambda _: case.call(impl, case.inputs)), None
    if which == "fwd":
        return (lambda leaves: case.call(impl, leaves)), (lambda: _leaves(case.inputs, True))
    if which == "bwd":
        return (lambda outs: backward(outs)), (lambda: case.call(impl, _leaves(case.inputs, True)))
    return (lambda leaves: backward(case.call(impl, leaves))), (lambda: _leaves(case.inputs, True))


def _first_call(case: Case, impl: Callable, st: Settings, grads) -> float:
    """Seconds of the first fwd+bwd (or sample) call: compilation included."""
    which = "sample" if case.passes == ("sample",) else "fwd+bwd"
    fn, setup = _pass_fns(case, impl, which, grads)
    return common.time_call(fn, st.device, setup)


def bench_case(case: Case, st: Settings, copy_gbps: float) -> list[dict]:
    rows = []
    with torch.no_grad():
        ref = case.call(case.impls["torch"], case.inputs)
    grads = [torch.randn_like(o) if o.is_floating_point() else None for o in ref]
    for name, impl in case.impls.items():
        if name == "torch.compile":
            seconds = _first_call(case, impl, st, grads)
            rows.append(common.row(SECTION, case.group, case.name, name, "first call (compile)", "s", value=seconds,
                                   n=1, passname="fwd+bwd" if "fwd+bwd" in case.passes or "bwd" in case.passes
                                   else case.passes[0], note="compilation time, not included in the rows below"))
    for which in case.passes:
        variants = {name: _pass_fns(case, impl, which, grads) for name, impl in case.impls.items()}
        timings = common.time_variants(variants, st)
        for name, timing in timings.items():
            fn, setup = variants[name]
            mem = common.peak_memory(fn, st.device, setup)
            gbps = case.bytes[which] / timing.median / 1e9 if which in case.bytes else None
            rows.append(common.timing_row(
                SECTION, case.group, case.name, name, timing, passname=which,
                gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps if gbps and copy_gbps else None,
                peak_mem_mib=mem, mem_method=common.memory_method(st.device) if mem is not None else None))
    common.add_speedups(rows, case.baseline)
    return rows


GROUPS = ("dct_crop", "idct_pad", "dct_pair", "gaussian_sample_kl", "gaussian_sample_kl_grouped", "dml_log_prob",
          "dml_sample", "conv1x1", "cpp_small")


def bench_ops(st: Settings, copy_gbps: float, groups: tuple[str, ...] = GROUPS) -> list[dict]:
    """Rows for every case, variant and pass of the selected groups."""
    backends, notes = common.timed_backends(st.device)
    st.notes.extend(n for n in notes if n not in st.notes)
    if st.quick and not st.cuda:
        st.notes.append("ops: no torch.compile variants in --quick on CPU (a cold compile is 10-40 s per graph)")
    presets = st.chosen(("mnist", "cifar10") if st.quick else ("mnist", "omniglot", "cifar10"))
    if not st.compile:
        st.notes.append("ops: no torch.compile variants (--no-compile)")
    rows = []
    for preset in presets:
        torch._dynamo.reset()  # a fresh compile cache per preset: never hit the recompile limit
        batch = 8 if st.quick else TRAIN_BATCH[preset]
        # a cold torch.compile costs 10-40 s per graph on 2 CPU cores: --quick compiles only on CUDA
        compile_groups = set(GROUPS) if st.compile and (not st.quick or st.cuda) else set()
        for case in make_cases(preset, batch, st.device, backends, compile_groups):
            if case.group not in groups or (preset == "omniglot" and case.group.startswith("gaussian")):
                continue  # omniglot's latents have mnist's shapes at the same batch: the mnist rows stand
            case_rows = common.guarded(st, SECTION, case.group, case.name, lambda: bench_case(case, st, copy_gbps))
            if st.quick:
                for r in case_rows:
                    r["note"] = (r["note"] + "; " if r["note"] else "") + f"reduced: batch {batch} (--quick)"
            rows += case_rows
            _print_progress(case_rows)
    if "cpp_small" in groups and "cpp" in backends:
        rows += cpp_small_rows(st)
    return rows


def cpp_small_rows(st: Settings) -> list[dict]:
    """bench/bench_cpp.py's cpp-vs-torch rows (issue 5's batch-8 op shapes, the mnist preset's 1x1 convs),
    in this harness's format."""
    try:
        try:
            from . import bench_cpp
        except ImportError:
            import bench_cpp
        raw = bench_cpp.bench_cpp_ops(st.quick)
    except Exception as exc:  # noqa: BLE001  a colleague's module, still moving: say why, carry on
        st.notes.append(f"ops.cpp_small skipped: bench/bench_cpp.py failed ({type(exc).__name__}: {exc})")
        return []
    rows = []
    for r in raw:
        rows.append(common.row(SECTION, "cpp_small", f"{r['section']}: {r['name']}", r["backend"], "time", "ms",
                               value=r["median_ms"], spread=r["iqr_ms"], passname=r["pass"],
                               note="bench/bench_cpp.py (issue 5's shapes)"))
    common.add_speedups(rows, "torch")
    _print_progress(rows)
    return rows


def _print_progress(rows: list[dict]) -> None:
    for r in rows:
        if r["metric"] == "time" and r["passname"] in ("fwd+bwd", "sample"):
            ratio = f"{r['ratio']:.2f}x vs {r['baseline']}" if r.get("ratio") else ""
            print(f"  [ops] {r['group']:26s} {r['case'][:60]:60s} {r['variant']:13s} {r['passname']:8s} "
                  f"{r['value']:10.3f} {r['unit']}  {ratio}", flush=True)
