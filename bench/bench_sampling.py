"""Sampling section: the 50-step sampler eager against compiled, and time against the number of steps.

Groups (select with --only sampling.<group>):
  * sample1000  model.sample(1000, steps=50) per preset:
                - "eager" (compile=False; baseline);
                - "compile=True": on CUDA the whole sampler captured as one CUDA graph, on CPU
                  torch.compile of the diffusion step and the generative pass (what
                  model.sample(compile=True) does on each device);
                - on CUDA also "torch.compile, no graph": the torch.compile'd pieces on the GPU,
                  through the private model._sample (dvp_fast.sampling.compiled_functions).
                The first call of each compiled variant (compilation or capture, plus one run) is
                its own row; the steady-state rows exclude it.
  * steps       time against the number of steps, ancestral and "ddim" samplers (compile=True on
                CUDA, eager on CPU), 1 to 50 steps.
  * students    the distilled few-step samplers (dvp-distill) against the 50-step teacher, mnist:
                students for 1 (predicting x), 2 and 4 steps, eager and, on CUDA, captured as a
                CUDA graph (compile=True). Their weights are untrained copies of the prior's
                network: the time of a student does not depend on its weights.
Sampling runs in eval mode, temperature 1, no gradients. Times are for the number of images in
the case name, never scaled. --quick and the CPU run use fewer images (and on CPU no
torch.compile in --quick, nor for cifar10: inductor needs minutes to compile a sampler on 2
cores); every such row says so.
"""
from __future__ import annotations

import time

import torch

from dvp_fast.model import DVPVAE

try:
    from . import common
    from .common import Settings
except ImportError:
    import common
    from common import Settings

SECTION = "sampling"
GROUPS = ("sample1000", "steps", "students")
STEPS = (1, 2, 5, 10, 25, 50)


def sample_settings(st: Settings) -> list[tuple[str, int, bool]]:
    """(preset, n, compiled variants?)"""
    if st.cuda:
        return [("mnist", 1000, True), ("omniglot", 1000, True), ("cifar10", 1000, True)]
    if st.quick:
        return [("mnist", 16, False), ("cifar10", 2, False)]
    # compiling the cifar10 sampler with inductor takes minutes on 2 cores: eager only on CPU
    return [("mnist", 1000, True), ("cifar10", 50, False)]


def steps_settings(st: Settings) -> list[tuple[str, int]]:
    if st.cuda:
        return [("mnist", 1000), ("cifar10", 1000)]
    if st.quick:
        return [("mnist", 16)]
    return [("mnist", 100)]


def _model(preset: str, st: Settings) -> tuple[DVPVAE, str]:
    torch.manual_seed(0)
    kw, width_note = common.quick_overrides(preset, st)
    model = DVPVAE.from_preset(preset, **kw).to(st.device).eval()
    model.validate_inputs = False
    return model, width_note


def _note(n: int, width_note: str) -> str:
    return "; ".join(filter(None, ["" if n == 1000 else f"reduced: {n} images (issue 6: 1000)", width_note]))


def bench_sample1000(st: Settings) -> list[dict]:
    rows = []
    for preset, n, compiled in st.chosen(sample_settings(st), preset_of=lambda setting: setting[0]):
        rows += common.guarded(st, SECTION, "sample1000", f"{preset}, {n} samples, 50 steps",
                               lambda: _sample_case(preset, n, compiled, st))
        common.free_memory(st.device)
    return rows


def _sample_case(preset: str, n: int, compiled: bool, st: Settings) -> list[dict]:
    model, width_note = _model(preset, st)
    case = f"{preset}, {n} samples, 50 steps"
    variants = {"eager": (lambda _: model.sample(n, steps=50), None)}
    first_rows = []
    if compiled and (st.cuda or st.compile):  # on a CPU compile=True is torch.compile, which --no-compile drops
        fn = lambda _: model.sample(n, steps=50, compile=True)
        first = common.time_call(fn, st.device)
        kind = "CUDA graph capture" if st.cuda else "torch.compile"
        first_rows.append(common.row(SECTION, "sample1000", case, "compile=True", "first call", "s",
                                     value=first, n=1, note=f"{kind} + one run at n={n}; not in the rows below"))
        variants["compile=True"] = (fn, None)
        if st.cuda and st.compile:
            compiled_pieces = _compiled_pieces(model, n)
            if compiled_pieces is not None:
                first = common.time_call(compiled_pieces, st.device)
                first_rows.append(common.row(SECTION, "sample1000", case, "torch.compile, no graph", "first call",
                                             "s", value=first, n=1, note="compilation + one run"))
                variants["torch.compile, no graph"] = (compiled_pieces, None)
    timings = common.time_variants(variants, st, warmup=1, repeats=5 if not st.cuda else 20, min_repeats=2)
    case_rows = []
    for name, t in timings.items():
        how = "CUDA graph" if st.cuda and name == "compile=True" else ""
        case_rows.append(common.timing_row(SECTION, "sample1000", case, name, t, unit="s",
                                           note="; ".join(filter(None, [_note(n, width_note), how])), preset=preset,
                                           n_images=n))
    common.add_speedups(case_rows, "eager")
    _progress(first_rows + case_rows)
    return first_rows + case_rows


def _compiled_pieces(model: DVPVAE, n: int):
    """model._sample with the torch.compile'd step and generative pass, on the GPU; None if the API moved."""
    try:
        from dvp_fast.sampling import compiled_functions

        fns = compiled_functions(model)
        return lambda _: model._sample(n, 1.0, 50, "ancestral", fns)
    except (ImportError, AttributeError, TypeError):
        return None


def bench_steps(st: Settings) -> list[dict]:
    rows = []
    for preset, n in st.chosen(steps_settings(st), preset_of=lambda setting: setting[0]):
        rows += common.guarded(st, SECTION, "steps", f"{preset}, {n} samples", lambda: _steps_case(preset, n, st))
        common.free_memory(st.device)
    return rows


def _steps_case(preset: str, n: int, st: Settings) -> list[dict]:
    model, width_note = _model(preset, st)
    case_rows = []
    for sampler in ("ancestral", "ddim"):
        variants = {f"{steps} steps": (lambda _, s=steps, sp=sampler: model.sample(n, steps=s, compile=st.cuda,
                                                                                  sampler=sp), None)
                    for steps in STEPS}
        timings = common.time_variants(variants, st, warmup=1, repeats=3 if not st.cuda else 20, min_repeats=2)
        for name, t in timings.items():
            steps = int(name.split()[0])
            case_rows.append(common.timing_row(
                SECTION, "steps", f"{preset}, {n} samples, {sampler}", name, t, unit="s",
                note="; ".join(filter(None, [_note(n, width_note),
                                             "compile=True (CUDA graph)" if st.cuda else "eager"])),
                preset=preset, sampler=sampler, steps=steps, n_images=n))
    common.add_speedups(case_rows, "50 steps")
    _progress(case_rows)
    return case_rows


def bench_students(st: Settings) -> list[dict]:
    n = 1000 if st.cuda or not st.quick else 16
    return common.guarded(st, SECTION, "students", f"mnist, {n} samples", lambda: _students_case(n, st))


def _students_case(n: int, st: Settings) -> list[dict]:
    import copy

    from dvp_fast.distill import predicts_for

    model, width_note = _model("mnist", st)
    for k in (1, 2, 4):
        model.add_student(k, copy.deepcopy(model.u_prior.unet), predicts_for(k))
    variants = {"teacher, 50 steps": (lambda _: model.sample(n, steps=50, compile=st.cuda, sampler="ancestral"), None)}
    for k in (1, 2, 4):
        draw = lambda _, k=k: model.sample(n, steps=k, compile=st.cuda, sampler="student")
        variants[f"student, {k} step{'s' if k > 1 else ''}"] = (draw, None)
    timings = common.time_variants(variants, st, warmup=1, repeats=3 if not st.cuda else 20, min_repeats=2)
    how = "compile=True (CUDA graph)" if st.cuda else "eager"
    case_rows = [common.timing_row(SECTION, "students", f"mnist, {n} samples", name, t, unit="s",
                                   note="; ".join(filter(None, [_note(n, width_note), how])), preset="mnist",
                                   n_images=n)
                 for name, t in timings.items()]
    common.add_speedups(case_rows, "teacher, 50 steps")
    _progress(case_rows)
    return case_rows


GROUP_FUNCS = {"sample1000": bench_sample1000, "steps": bench_steps, "students": bench_students}


def bench_sampling(st: Settings, groups: tuple[str, ...] = GROUPS) -> list[dict]:
    rows = []
    for g in groups:
        t0 = time.perf_counter()
        with torch.no_grad():
            rows += GROUP_FUNCS[g](st)
        print(f"  [sampling] {g} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _progress(rows: list[dict]) -> None:
    for r in rows:
        ratio = f"{r['ratio']:.2f}x ({r['ratio_kind']})" if r.get("ratio") else ""
        print(f"  [sampling] {r['case'][:40]:40s} {r['variant'][:24]:24s} {r['metric']:10s} {r['value']:10.4g} "
              f"{r['unit']}  {ratio}", flush=True)
