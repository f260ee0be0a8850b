"""dvp_fast benchmarks: ops, model and sampling, side by side in one run, with the run recorded.

    python bench/run.py [--device cpu|cuda] [--quick] [--only NAME ...] [--presets NAME ...] [--paper-batch]
                        [--no-compile] [--case-budget S] [--out bench/results] [--threads N]

Sections and their groups (--only takes a section, or section.group; they run in the order given):
  ops       dct_crop, idct_pad, dct_pair, gaussian_sample_kl, gaussian_sample_kl_grouped, dml_log_prob,
            dml_sample, conv1x1, cpp_small                                          (bench/bench_ops.py)
  model     train, table6, iwae, pipeline                                          (bench/bench_model.py)
  sampling  sample1000, steps, students                                            (bench/bench_sampling.py)
Writes <out>/<device>-<date>[-quick][-partial].{json,md} after every group (a run stopped part way
keeps what it measured; the files say which groups are done), PNG plots beside them at the end,
and prints the table. Every ratio compares two variants measured in this run; see
bench/results/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
import report  # noqa: E402
from dvp_fast.config import PRESETS  # noqa: E402

SECTIONS = {
    "ops": ("dct_crop", "idct_pad", "dct_pair", "gaussian_sample_kl", "gaussian_sample_kl_grouped", "dml_log_prob",
            "dml_sample", "conv1x1", "cpp_small"),
    "model": ("train", "table6", "iwae", "pipeline"),
    "sampling": ("sample1000", "steps", "students"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: every section in ~2 minutes")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="sections or section.group to run, e.g. ops model.train sampling.steps")
    p.add_argument("--presets", nargs="+", metavar="PRESET", default=None, choices=PRESETS,
                   help="only these presets, in this order (default: each section's own list)")
    p.add_argument("--paper-batch", action="store_true",
                   help="model.train at each preset's own batch size only (mnist 250, cifar10 128)")
    p.add_argument("--no-compile", action="store_true",
                   help="no torch.compile (inductor) variants; on CUDA the sampler's graph capture stays")
    p.add_argument("--case-budget", type=float, default=None, metavar="S",
                   help="stop repeating a case after S seconds (default 20 on CUDA, 8 on CPU, 2 with --quick)")
    p.add_argument("--out", default=os.path.join(common.REPO, "bench", "results"), help="results folder")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's). On a loaded shared CPU, 1 avoids OpenMP "
                        "oversubscription, which makes small ops tens of times slower and very noisy")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="use the existing torch.compile cache (first-call rows then understate compile cost)")
    return p.parse_args(argv)


def selection(only: list[str] | None) -> dict[str, tuple[str, ...]]:
    """{section: groups} chosen by --only (all when None), in the order named; unknown names are an error."""
    if not only:
        return dict(SECTIONS)
    chosen: dict[str, list[str]] = {}
    for name in only:
        section, _, group = name.partition(".")
        if section not in SECTIONS:
            raise SystemExit(f"bench/run.py: unknown section {section!r}; sections: {', '.join(SECTIONS)}")
        if group and group not in SECTIONS[section]:
            raise SystemExit(f"bench/run.py: unknown group {name!r}; groups of {section}: "
                             f"{', '.join(SECTIONS[section])}")
        groups = chosen.setdefault(section, [])
        for g in ([group] if group else SECTIONS[section]):
            if g not in groups:
                groups.append(g)
    return {section: tuple(groups) for section, groups in chosen.items()}


def run_group(section: str, group: str, st: common.Settings, copy_gbps: float) -> list[dict]:
    """The rows of one group of one section."""
    if section == "ops":
        import bench_ops

        return bench_ops.bench_ops(st, copy_gbps, (group,))
    if section == "model":
        import bench_model

        return bench_model.bench_model(st, (group,))
    import bench_sampling

    return bench_sampling.bench_sampling(st, (group,))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/run.py: --device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = selection(args.only)
    st = common.Settings.make(args.device, args.quick)
    st.presets, st.paper_batch, st.compile = args.presets and tuple(args.presets), args.paper_batch, not args.no_compile
    if args.case_budget is not None:
        st.budget_s = args.case_budget
    t_start = time.perf_counter()
    st.notes.append(common.steady_malloc())
    # A cold torch.compile cache, so that "first call" rows show what a first compile costs
    # (inductor reads the variable when it first compiles, long after torch is imported).
    if args.warm_compile_cache:
        st.notes.append(f"torch.compile cache: as found ({os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}); "
                        f"first-call rows may understate compile cost")
    else:
        cache = tempfile.mkdtemp(prefix="dvp_bench_inductor_")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        st.notes.append("torch.compile cache: cold (a fresh TORCHINDUCTOR_CACHE_DIR for this run)")
    env = common.environment(st)
    if st.device.type == "cpu" and env["load_average"] and env["load_average"][0] > (os.cpu_count() or 1):
        st.notes.append(f"the machine was loaded at the start (1-min load average {env['load_average'][0]:.1f} on "
                        f"{os.cpu_count()} CPUs): CPU times are noisy; compare ratios, not absolute values")

    print(f"# dvp_fast bench: {env['device_name']} ({st.device}), torch {env['torch']}, triton {env['triton']}, "
          f"commit {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}, "
          f"{env['torch_threads']} threads{', quick' if st.quick else ''}", flush=True)
    t0 = time.perf_counter()
    backends, backend_notes = common.timed_backends(st.device)  # builds the C++ kernels if needed
    env["backends_timed"] = backends
    env["backend_load_s"] = time.perf_counter() - t0
    st.notes.extend(backend_notes)
    print(f"# backends timed: {', '.join(backends)} (loaded in {env['backend_load_s']:.1f} s)", flush=True)
    bw = common.copy_bandwidth(st)
    print(f"# copy bandwidth: {bw['median_gbps']:.1f} GB/s (IQR {bw['iqr_gbps']:.1f}), {bw['method']}", flush=True)

    sections: dict[str, dict] = {}
    result = dict(environment=env, copy_bandwidth=bw, notes=st.notes, sections=sections, complete=False)
    stem = report.stem(env, partial=args.only is not None or args.presets is not None)
    todo = [f"{section}.{group}" for section, groups in chosen.items() for group in groups]
    for section, groups in chosen.items():
        print(f"== {section}: {', '.join(groups)}", flush=True)
        sec = sections[section] = dict(groups=[], seconds=0.0, rows=[])
        torch._dynamo.reset()
        for group in groups:
            t0 = time.perf_counter()
            sec["rows"] += run_group(section, group, st, bw["median_gbps"])
            sec["groups"].append(group)
            sec["seconds"] += time.perf_counter() - t0
            todo.remove(f"{section}.{group}")
            # What is measured so far, on disk: a run stopped at a time limit keeps it.
            env["total_seconds"] = time.perf_counter() - t_start
            result["not_yet_run"] = todo
            report.write(result, args.out, stem, plots=False)
        print(f"== {section} done in {sec['seconds']:.0f} s", flush=True)

    env["total_seconds"] = time.perf_counter() - t_start
    result["complete"] = True
    paths = report.write(result, args.out, stem, plots=not args.no_plots)
    print(report.text_table(result))
    for p in paths:
        print(f"# wrote {os.path.relpath(p)}")
    print(f"# total {env['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
