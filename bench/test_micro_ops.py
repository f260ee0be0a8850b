"""pytest-benchmark micro-benchmarks of the CPU ops, every available CPU backend, small shapes.

    pytest bench/test_micro_ops.py --benchmark-only [--benchmark-group-by=group]

DVP_BENCH_THREADS=N sets torch's thread count (on a loaded shared machine 1 avoids OpenMP
oversubscription, which makes small ops tens of times slower). Not part of the default test run (testpaths is tests/, and addopts has --benchmark-skip;
--benchmark-only overrides it). The cases are bench_ops.make_cases at cifar10 and mnist shapes,
batch 8, so these numbers line up with `bench/run.py --quick --only ops`; each benchmark is one
op, one backend, one pass, its fresh leaf inputs made in an untimed setup.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_ops  # noqa: E402
import common  # noqa: E402

BATCH = 8
if os.environ.get("DVP_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["DVP_BENCH_THREADS"]))
BACKENDS, _ = common.timed_backends(torch.device("cpu"))


def _params():
    out = []
    for preset in ("mnist", "cifar10"):
        for case in bench_ops.make_cases(preset, BATCH, torch.device("cpu"), BACKENDS, set()):
            for variant in case.impls:
                for which in case.passes:
                    out.append(pytest.param(case, variant, which,
                                            id=f"{case.group}-{preset}-{variant}-{which}"))
    return out


@pytest.mark.parametrize("case,variant,which", _params())
def test_op(benchmark, case, variant, which):
    benchmark.group = f"{case.group} {case.name} {which}"
    with torch.no_grad():
        ref = case.call(case.impls["torch"], case.inputs)
    grads = [torch.randn_like(o) for o in ref]
    fn, setup = bench_ops._pass_fns(case, case.impls[variant], which, grads)
    if setup is None:
        benchmark.pedantic(fn, args=(None,), rounds=30, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, setup=lambda: ((setup(),), {}), rounds=30, warmup_rounds=2)
