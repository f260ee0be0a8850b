"""Model section: training-step throughput and memory, the paper's Table 6, IWAE evaluation, input pipeline.

Groups (select with --only model.<group>):
  * train     images/s and peak memory of one full optimisation step (`Trainer.step`: forward,
              backward, clipping, Adamax, EMA; no host sync) per preset, at several batch sizes:
              - "eager fp32": the pure-PyTorch op fallbacks everywhere (`force_torch_backend`),
                float32, NCHW: the path that does what the authors' code does (baseline);
              - "fast": ops with backend="auto" (triton on CUDA, cpp on CPU when built), and on
                CUDA bf16 autocast and channels_last weights, as dvp-train runs.
              Both use dvp_fast's Trainer and model, so the ratio measures kernels, precision and
              layout only; the reference code's host syncs and per-tensor loops are not in it.
              TF32 matmuls are on for both on CUDA (the reference trains with TF32).
  * table6    DVP-VAE against the top-layer VampPrior baseline with K pseudo-images (paper
              Table 6): time per epoch (median step time x iterations per epoch), peak memory,
              trainable parameters, sampling time per 1000 images; all on the fast path.
  * iwae      model.nll(x, num_samples=K) throughput in images/s, fast vs eager.
  * pipeline  input pipeline batches/s from bench/bench_data.py (DeviceBatches vs DataLoader).
On CPU the presets run at reduced batch sizes (and K, n where stated); every such row says so.
"""
from __future__ import annotations

import contextlib
import math
import re
import time

import torch

from dvp_fast.config import model_preset, train_preset
from dvp_fast.model import DVPVAE
from dvp_fast.trainer import Trainer

try:
    from . import common
    from .common import Settings
except ImportError:
    import common
    from common import Settings

SECTION = "model"
GROUPS = ("train", "table6", "iwae", "pipeline")
PAPER_BATCH = {"mnist": 250, "omniglot": 250, "cifar10": 128}
ITERS_PER_EPOCH = {"mnist": 220, "omniglot": 93, "cifar10": 351}  # SPEC §2, drop_last


# --- sizes per device ------------------------------------------------------------------------------------
def train_sizes(st: Settings) -> dict[str, list[int]]:
    """Batch sizes of the train group; the preset's own batch size is marked in the rows."""
    if st.cuda:
        return {"mnist": [64, 128, 250, 500], "omniglot": [128, 250], "cifar10": [32, 64, 128]}
    if st.quick:
        return {"mnist": [4], "omniglot": [4], "cifar10": [2]}
    return {"mnist": [16, 64], "omniglot": [32], "cifar10": [4]}


def table6_settings(st: Settings) -> list[tuple[str, dict, int, list[int], list[int], int]]:
    """(label, model overrides, batch, [K timed], [K for memory and size only], samples n) per setting."""
    if st.cuda:
        return [("mnist (32 ch)", {}, 250, [500, 1000], [250, 2000], 1000),
                ("mnist (64 ch)", {"num_ch": 64}, 250, [500, 1000], [], 1000),
                ("cifar10", {}, 128, [500, 750, 1000], [250], 1000)]
    if st.quick:
        return [("mnist (32 ch)", {}, 4, [25, 50], [], 16)]
    return [("mnist (32 ch)", {}, 64, [500, 1000], [250], 250)]


def iwae_settings(st: Settings) -> list[tuple[str, int, int]]:
    """(preset, batch, K)."""
    if st.cuda:
        return [("mnist", 100, 1000), ("omniglot", 100, 1000), ("cifar10", 16, 1000)]
    if st.quick:
        return [("mnist", 2, 8), ("cifar10", 1, 2)]
    return [("mnist", 4, 64), ("omniglot", 4, 64), ("cifar10", 1, 8)]


# --- helpers ---------------------------------------------------------------------------------------------
def _preset_of(label: str) -> str:
    return label.split()[0]


def random_images(cfg, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Images on the 8-bit grid of [-1, 1], as DeviceBatches produces them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, cfg.image_channels, cfg.image_size, cfg.image_size), generator=gen)
    return (x.float() / 127.5 - 1.0).to(device)


def build_model(preset: str, st: Settings, fast: bool, **overrides) -> DVPVAE:
    model = DVPVAE.from_preset(preset, **overrides).to(st.device)
    model.validate_inputs = False  # the per-call range check is one host sync; dvp-train turns it off too
    if fast and st.cuda:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_trainer(model: DVPVAE, preset: str, batch: int, st: Settings, fast: bool) -> Trainer:
    cfg = train_preset(preset, batch_size=batch)
    trainer = Trainer(model, cfg, ITERS_PER_EPOCH[preset], precision="bf16" if (fast and st.cuda) else "fp32")
    trainer.ema.model.validate_inputs = False
    return trainer


def path_context(fast: bool):
    return contextlib.nullcontext() if fast else common.force_torch_backend()


def _step_fn(trainer: Trainer, x: torch.Tensor, fast: bool):
    def step(_):
        with path_context(fast):
            trainer.step(x)

    return step


def _dispatch_of(fn, st: Settings) -> str:
    with common.record_dispatch() as seen:
        fn(None)
    common.sync(st.device)
    return common.describe_dispatch(seen)


def _free(st: Settings) -> None:
    common.free_memory(st.device)


def _reduced_note(preset: str, batch: int, st: Settings) -> str:
    if batch == PAPER_BATCH[preset]:
        return "preset batch size"
    return f"reduced: batch {batch} (preset {PAPER_BATCH[preset]})" if batch < PAPER_BATCH[preset] else \
        f"batch {batch} (preset {PAPER_BATCH[preset]})"


def _mem_rows(group, case, variant, mem: tuple | None, st: Settings, note: str, **extra) -> list[dict]:
    if mem is None:
        return [common.row(SECTION, group, case, variant, "peak memory", "MiB", value=math.nan, note=(
            note + "; " if note else "") + "peak memory not measurable here", **extra)]
    delta, total = mem
    return [common.row(SECTION, group, case, variant, "peak memory", "MiB", value=delta, n=1, note=note,
                       mem_method=common.memory_method(st.device), peak_total_mib=total, **extra)]


def peak_memory_full(fn, st: Settings) -> tuple[float, float | None] | None:
    """(peak extra MiB of fn over what was allocated before, absolute peak MiB on CUDA or None)."""
    if st.cuda:
        common.sync(st.device)
        common.release_flush_buffer()  # the timing clock's 256 MiB L2-flush buffer is not the model's
        before = torch.cuda.memory_allocated(st.device)
        torch.cuda.reset_peak_memory_stats(st.device)
        fn(None)
        common.sync(st.device)
        peak = torch.cuda.max_memory_allocated(st.device)
        return (peak - before) / 2 ** 20, peak / 2 ** 20
    delta = common.peak_memory(fn, st.device)
    return None if delta is None else (delta, None)


# --- train ----------------------------------------------------------------------------------------------
def _new_step(preset: str, batch: int, x: torch.Tensor, st: Settings, fast: bool, **overrides):
    torch.manual_seed(0)
    model = build_model(preset, st, fast, **overrides)
    trainer = make_trainer(model, preset, batch, st, fast)
    return model, _step_fn(trainer, x, fast)


def _alone_memory(preset, batch, x, st, fast, **overrides) -> tuple[tuple | None, str, object]:
    """(peak memory, dispatched ops, step fn) of a step with only this model alive, after one warm step.

    On CUDA the model is freed afterwards (the absolute peak of the next must not include it) and
    None is returned instead of the step; on CPU, where only the delta is measured, it is kept.
    """
    model, fn = _new_step(preset, batch, x, st, fast, **overrides)
    dispatch = _dispatch_of(fn, st)
    if not fast and any(not part.endswith(":torch") for part in dispatch.split(", ")):
        raise RuntimeError(f"force_torch_backend did not force the fallbacks (ops ran: {dispatch}); "
                           f"the dispatch point in dvp_fast.ops._backend has moved")
    mem = peak_memory_full(fn, st)
    if st.cuda:
        del model, fn
        _free(st)
        fn = None
    return mem, dispatch, fn


def bench_train(st: Settings) -> list[dict]:
    rows = []
    sizes = train_sizes(st)
    for preset in st.chosen(sizes):
        batches = [PAPER_BATCH[preset]] if st.paper_batch else sizes[preset]
        for batch in batches:
            rows += common.guarded(st, SECTION, "train", f"{preset}, batch {batch}",
                                   lambda: _train_case(preset, batch, st))
            _free(st)
    return rows


def _train_case(preset: str, batch: int, st: Settings) -> list[dict]:
    """Memory first, each variant alone (so CUDA's absolute peak is its own); then interleaved timing."""
    case = f"{preset}, batch {batch}"
    kw, width_note = common.quick_overrides(preset, st)
    note = "; ".join(filter(None, [_reduced_note(preset, batch, st), width_note]))
    x = random_images(model_preset(preset), batch, st.device)
    paths = (("eager fp32", False), ("fast", True))
    info = {name: _alone_memory(preset, batch, x, st, fast, **kw) for name, fast in paths}
    variants = {name: (info[name][2] or _new_step(preset, batch, x, st, fast, **kw)[1], None) for name, fast in paths}
    timings = common.time_variants(variants, st, warmup=None if st.cuda else 0)
    case_rows = []
    for name, timing in timings.items():
        t = common.Timing([batch / s for s in timing.samples])
        mem, dispatch, _ = info[name]
        case_rows.append(common.row(
            SECTION, "train", case, name, "throughput", "images/s", value=t.median, spread=t.iqr,
            n=len(t.samples), note=note, preset=preset, batch=batch, dispatch=dispatch,
            step_ms=timing.median * 1e3, step_iqr_ms=timing.iqr * 1e3))
        case_rows += _mem_rows("train", case, name, mem, st, note, preset=preset, batch=batch)
    common.add_speedups(case_rows, "eager fp32")
    _progress(case_rows)
    return case_rows


# --- Table 6 ---------------------------------------------------------------------------------------------
def _sample_seconds(model: DVPVAE, n: int, st: Settings) -> common.Timing:
    model.eval()
    fn = lambda _: model.sample(n, steps=50, compile=st.cuda)  # CUDA graph on GPU; eager on CPU
    timing = common.time_variants({"s": (fn, None)}, st, warmup=1, repeats=2 if st.quick else 3,
                                  min_repeats=2)["s"]
    model.train()
    return timing


def bench_table6(st: Settings) -> list[dict]:
    """One model after another, each alone in memory: build, warm step, memory, step time, sampling."""
    rows = []
    for label, overrides, batch, ks, ks_mem, n in st.chosen(table6_settings(st),
                                                           preset_of=lambda setting: _preset_of(setting[0])):
        preset = _preset_of(label)
        case = f"{label}, batch {batch}"
        note = _reduced_note(preset, batch, st)
        x = random_images(model_preset(preset), batch, st.device)
        models = {"DVP": dict(overrides)}
        for k in sorted(ks + ks_mem):
            models[f"VampPrior K={k}"] = dict(overrides, pseudoinputs=False, prior="vampprior", num_pseudoinputs=k)
        timed = {"DVP", *(f"VampPrior K={k}" for k in ks)}
        iters = ITERS_PER_EPOCH[preset]
        full_batch = batch == PAPER_BATCH[preset]
        steps_per_epoch = iters if full_batch else (55000 if preset == "mnist" else 50000) / batch
        epoch_note = (f"derived: median step time x {iters} steps per epoch" if full_batch else
                      f"derived: median step time x {steps_per_epoch:g} steps (an epoch at the reduced batch)")
        setting_rows = []
        for name, kw in models.items():
            setting_rows += common.guarded(st, SECTION, "table6", case, lambda: _table6_model(
                preset, batch, x, st, name, kw, case, note, name in timed, steps_per_epoch, epoch_note, n), name)
            _free(st)
        common.add_speedups(setting_rows, "DVP", key=("section", "group", "case", "metric"))
        rows += setting_rows
        _progress(setting_rows)
    return rows


def _table6_model(preset, batch, x, st, name, kw, case, note, timed, steps_per_epoch, epoch_note, n) -> list[dict]:
    k = _k_of(name)
    model, fn = _new_step(preset, batch, x, st, True, **kw)
    fn(None)
    mem = peak_memory_full(fn, st)
    rows = _mem_rows("table6", case, name, mem, st, note, preset=preset, k=k)
    rows.append(common.row(SECTION, "table6", case, name, "parameters", "count", value=float(model.num_parameters()),
                           n=1, preset=preset, k=k, note="trainable" + (
                               "" if timed else "; memory and size only (for the memory-against-K plot)")))
    if not timed:
        return rows
    t = common.time_variants({name: (fn, None)}, st, warmup=0, min_repeats=2)[name]  # warm: two steps above
    rows.append(common.row(SECTION, "table6", case, name, "train time per epoch", "s", value=t.median * steps_per_epoch,
                           spread=t.iqr * steps_per_epoch, n=len(t.samples), note=f"{note}; {epoch_note}",
                           step_ms=t.median * 1e3, preset=preset, k=k))
    s = _sample_seconds(model, n, st)
    rows.append(common.row(SECTION, "table6", case, name, f"sampling time per {n} images", "s", value=s.median,
                           spread=s.iqr, n=len(s.samples), preset=preset, k=k, note="; ".join(filter(None, [
                               "50 diffusion steps" if name == "DVP" else "",
                               "" if n == 1000 else f"reduced: {n} images (the paper: 1000)",
                               "compile=True (CUDA graph)" if st.cuda else "eager"]))))
    return rows


def _k_of(name: str) -> int | None:
    m = re.search(r"K=(\d+)", name)
    return int(m.group(1)) if m else None


# --- IWAE ------------------------------------------------------------------------------------------------
def bench_iwae(st: Settings) -> list[dict]:
    rows = []
    for preset, batch, k in st.chosen(iwae_settings(st), preset_of=lambda setting: setting[0]):
        rows += common.guarded(st, SECTION, "iwae", f"{preset}, K={k}", lambda: _iwae_case(preset, batch, k, st))
        _free(st)
    return rows


def _iwae_case(preset: str, batch: int, k: int, st: Settings) -> list[dict]:
    torch.manual_seed(0)
    kw, width_note = common.quick_overrides(preset, st)
    model = build_model(preset, st, True, **kw).eval()
    x = random_images(model.config, batch, st.device)
    max_rows = 4096 if st.cuda else 256
    variants = {}
    for name, fast in (("eager fp32", False), ("fast", True)):
        def fn(_, fast=fast):
            with path_context(fast):
                model.nll(x, num_samples=k, max_rows=max_rows)

        variants[name] = (fn, None)
    # a call is seconds long at these sizes: a few repeats suffice
    timings = common.time_variants(variants, st, warmup=1, repeats=5 if st.cuda else st.repeats, min_repeats=2)
    note = f"{batch} images x K={k} importance samples, chunks of {max_rows} rows"
    if not st.cuda:
        note += "; reduced (CPU): the paper uses K=1000"
    if width_note:
        note += "; " + width_note
    case_rows = []
    for name, timing in timings.items():
        t = common.Timing([batch / s for s in timing.samples])
        case_rows.append(common.row(SECTION, "iwae", f"{preset}, K={k}", name, "throughput", "images/s",
                                    value=t.median, spread=t.iqr, n=len(t.samples), note=note, preset=preset,
                                    rows_per_s=t.median * k))
    common.add_speedups(case_rows, "eager fp32")
    _progress(case_rows)
    return case_rows


# --- pipeline --------------------------------------------------------------------------------------------
_PIPE_NAME = re.compile(r"^(?P<ds>\w+)-shaped (?P<label>.+?), batch (?P<batch>\d+), N=(?P<n>\d+), (?P<dev>\w+)$")


def bench_pipeline_rows(st: Settings) -> list[dict]:
    """bench_data.bench_pipeline's rows in this harness's format (its spread is max-min over repeats)."""
    try:
        from . import bench_data
    except ImportError:
        import bench_data
    raw = bench_data.bench_pipeline(str(st.device), st.quick)
    spreads = {r["name"][:-len(" spread")]: r["value"] for r in raw if r["name"].endswith(" spread")}
    rows = []
    for r in raw:
        if r["name"].endswith(" spread"):
            continue
        m = _PIPE_NAME.match(r["name"])
        case, variant = (f"{m['ds']}-shaped, batch {m['batch']}, N={m['n']}", m["label"]) if m else (r["name"], "")
        pct = spreads.get(r["name"])
        rows.append(common.row(SECTION, "pipeline", case, variant, "throughput", r["unit"], value=r["value"],
                               spread=None if pct is None else r["value"] * pct / 100, n=3 if st.quick else 7,
                               note="bench/bench_data.py; spread = max - min over epochs"))
        if pct is not None:
            rows[-1]["spread_kind"] = "max-min"
    base = "HostBatches (DataLoader, 0 workers)"
    common.add_speedups(rows, base, key=("section", "group", "case", "metric"))
    _progress(rows)
    return rows


GROUP_FUNCS = {"train": bench_train, "table6": bench_table6, "iwae": bench_iwae, "pipeline": bench_pipeline_rows}


def bench_model(st: Settings, groups: tuple[str, ...] = GROUPS) -> list[dict]:
    if st.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for g in groups:
        t0 = time.perf_counter()
        rows += common.guarded(st, SECTION, g, "(whole group)", lambda: GROUP_FUNCS[g](st))
        print(f"  [model] {g} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _progress(rows: list[dict]) -> None:
    for r in rows:
        v = r["value"]
        ratio = f"{r['ratio']:.2f} ({r['ratio_kind']})" if r.get("ratio") else ""
        print(f"  [model] {r['group']:8s} {r['case'][:40]:40s} {r['variant'][:36]:36s} {r['metric'][:30]:30s} "
              f"{v:12.4g} {r['unit']:9s} {ratio}", flush=True)
