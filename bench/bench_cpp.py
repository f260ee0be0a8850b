"""Native CPU kernels ("cpp") against the PyTorch fallback ("torch"), side by side in one run.

    python bench/bench_cpp.py [--quick] [--threads N] [--clock wall|cpu] [--train]

Every op at the shapes of issue 5 (CPU tensors, float32):
  * dml:          dml_log_prob, batch 8, 3 x 32 x 32, 10 mixtures;
  * gaussian_kl:  the 28 cifar10 latents at batch 8, 4 x (3,4,4), 6 x (3,8,8), 8 x (3,16,16),
                  10 x (3,32,32), noise drawn inside the op as in the model: one
                  gaussian_sample_kl call per layer (what model.py does), and the grouped op;
  * dct:          dct_crop (8,3,32,32) -> d = 7 and (8,1,28,28) -> 7, and idct_pad back;
  * conv1x1:      the mnist preset's 1x1 convolutions at its training batch (250, 32 channels), of
                  SiLU(x) at 28 x 28 and 14 x 14 (the residual blocks) and of x at 14 x 14
                  (batch 32 with --quick).
With --train, a full mnist-preset training step (batch 250, `Trainer.step`) in interleaved pairs,
cpp then torch or torch then cpp in turn, reported as the median and quartiles of the per-pair ratios.
Passes: "fwd" is the forward with autograd recording (inputs require grad, as in training; the
cpp DML forward also writes its gradient then), "bwd" the backward alone (the forward of each
repeat runs untimed), "fwd+bwd" both. For each repeat the backends run in turn, so load on the
machine hits both alike; values are the median and the inter-quartile range of perf_counter
times over the repeats, in milliseconds. On a shared, loaded machine, `--threads 1 --clock cpu`
(process CPU time instead of wall time) removes most of the time-slicing noise; with more than
one thread the CPU clock sums the threads, so use the wall clock there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch

from dvp_fast import ops
from dvp_fast.ops.dct import dct_scale_bound

BACKENDS = ("torch", "cpp")
PASSES = ("fwd", "bwd", "fwd+bwd")
CIFAR_LATENTS = [(3, 4, 4)] * 4 + [(3, 8, 8)] * 6 + [(3, 16, 16)] * 8 + [(3, 32, 32)] * 10


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# Each case: (section, name, prepare, forward): prepare() makes fresh leaf inputs (untimed) and
# forward(inputs, backend) returns the outputs; the upstream gradients are fixed random tensors
# shaped like the outputs (drawn once, outside the timing).
def _dml_case():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=gen).float() / 127.5 - 1.0
    params = torch.randn(8, 100, 32, 32, generator=gen)
    return ("dml", "dml_log_prob B=8 3x32x32 M=10", lambda: [_leaf(params)],
            lambda inputs, backend: [ops.dml_log_prob(x, inputs[0], 10, backend=backend)])


def _kl_layers():
    gen = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(8, *shape, generator=gen) for _ in range(4)) for shape in CIFAR_LATENTS]


def _kl_cases():
    layers = _kl_layers()

    def prepare():
        return [tuple(map(_leaf, layer)) for layer in layers]

    def per_layer(inputs, backend):
        out = []
        for layer in inputs:
            out += ops.gaussian_sample_kl(*layer, backend=backend)
        return out

    def grouped(inputs, backend):
        zs, kl = ops.gaussian_sample_kl_grouped(inputs, backend=backend)
        return [*zs, kl]

    return [("gaussian_kl", "gaussian_sample_kl x 28 calls, cifar10 latents B=8", prepare, per_layer),
            ("gaussian_kl", "gaussian_sample_kl_grouped, 28 cifar10 latents B=8", prepare, grouped)]


def _dct_cases():
    cases = []
    for channels, size in ((3, 32), (1, 28)):
        gen = torch.Generator().manual_seed(size)
        x = torch.rand(8, channels, size, size, generator=gen) * 2 - 1
        scale = dct_scale_bound(channels, 7, size) * 0.5
        u = torch.rand(8, channels, 7, 7, generator=gen) * 2 - 1
        cases.append(("dct", f"dct_crop (8,{channels},{size},{size}) -> d=7", lambda x=x: [_leaf(x)],
                      lambda inputs, backend, scale=scale: [ops.dct_crop(inputs[0], scale, backend=backend)]))
        cases.append(("dct", f"idct_pad (8,{channels},7,7) -> {size}", lambda u=u: [_leaf(u)],
                      lambda inputs, backend, scale=scale, size=size: [ops.idct_pad(inputs[0], scale, size,
                                                                                    backend=backend)]))
    return cases


def _conv1x1_cases(batch: int):
    cases = []
    for side, silu in ((28, True), (14, True), (14, False)):
        gen = torch.Generator().manual_seed(side)
        x = torch.randn(batch, 32, side, side, generator=gen)
        conv = torch.nn.Conv2d(32, 32, 1)
        act = "SiLU(x)" if silu else "x"
        cases.append(("conv1x1", f"conv1x1 of {act} ({batch},32,{side},{side}) -> 32",
                      lambda x=x: [_leaf(x), _leaf(conv.weight), _leaf(conv.bias)],
                      lambda inputs, backend, silu=silu: [ops.conv1x1(*inputs, silu=silu, backend=backend)]))
    return cases


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_once(prepare: Callable, forward: Callable, backend: str, grads: list[torch.Tensor], which: str,
               clock: Callable) -> float:
    inputs = prepare()
    t0 = clock()
    outs = forward(inputs, backend)
    t1 = clock()
    torch.autograd.backward(outs, grads)
    t2 = clock()
    return {"fwd": t1 - t0, "bwd": t2 - t1, "fwd+bwd": t2 - t0}[which]


def _quartiles(values: list[float]) -> tuple[float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q3 - q1


def bench_cpp_ops(quick: bool, clock: str = "wall") -> list[dict]:
    """Rows {"section", "name", "backend", "pass", "median_ms", "iqr_ms"} for every op, pass and backend;
    `clock` is "wall" (perf_counter) or "cpu" (process_time)."""
    if not ops.backend_available("cpp"):
        raise RuntimeError("the cpp backend is not available here (see the warning above)")
    warmup, repeats = (3, 15) if quick else (10, 60)
    cases = [_dml_case(), *_kl_cases(), *_dct_cases(), *_conv1x1_cases(32 if quick else 250)]
    rows = []
    for section, name, prepare, forward in cases:
        gen = torch.Generator().manual_seed(2)
        grads = [torch.randn(o.shape, generator=gen) for o in forward(prepare(), "torch")]
        for which in PASSES:
            times = {backend: [] for backend in BACKENDS}
            for rep in range(warmup + repeats):
                for backend in BACKENDS:
                    elapsed = _time_once(prepare, forward, backend, grads, which, CLOCKS[clock])
                    if rep >= warmup:
                        times[backend].append(elapsed * 1e3)
            for backend in BACKENDS:
                median, iqr = _quartiles(times[backend])
                rows.append({"section": section, "name": name, "backend": backend, "pass": which,
                             "median_ms": median, "iqr_ms": iqr})
    return rows


def bench_train_step(quick: bool, clock: str = "wall", preset: str = "mnist", batch: int = 250,
                     pairs: int = 30) -> tuple[list[dict], dict]:
    """One full training step of a preset model on CPU (`Trainer.step`: forward, loss, backward, gradient
    clipping, Adamax, EMA), with the model's ops (backend "auto") on cpp or on torch via
    ops.use_backend, timed in interleaved pairs: pair i runs torch then cpp for even i and cpp then
    torch for odd i, so drifts in machine speed hit both alike. Returns rows (as bench_cpp_ops) and a
    summary of the per-pair ratios torch / cpp."""
    from dvp_fast import DVPVAE, train_preset  # noqa: PLC0415  (only this benchmark needs the model)
    from dvp_fast.trainer import Trainer  # noqa: PLC0415

    torch.manual_seed(0)
    model = DVPVAE.from_preset(preset)
    model.validate_inputs = False  # the input check syncs the host; not part of a training step's work
    cfg = model.config
    x = torch.rand(batch, cfg.image_channels, cfg.image_size, cfg.image_size)
    # binary pixels for the Bernoulli presets, the 256 levels for the mixture of logistics
    x = torch.bernoulli(x) * 2 - 1 if cfg.image_channels == 1 else torch.round(x * 255) / 127.5 - 1
    model.fit_pseudoinput_scale(x)
    trainer = Trainer(model, train_preset(preset, batch_size=batch), steps_per_epoch=220)

    def step(backend: str) -> float:
        t0 = CLOCKS[clock]()
        with ops.use_backend(backend):  # what backend="auto" inside the model resolves to
            trainer.step(x)
        return (CLOCKS[clock]() - t0) * 1e3

    warmup, pairs = (1, 3) if quick else (2, pairs)
    for _ in range(warmup):
        step("torch"), step("cpp")
    times = {backend: [] for backend in BACKENDS}
    for i in range(pairs):
        for backend in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
            times[backend].append(step(backend))
    rows = []
    name = f"{preset} preset training step, batch {batch}"
    for backend in BACKENDS:
        median, iqr = _quartiles(times[backend])
        rows.append({"section": "train", "name": name, "backend": backend, "pass": "step", "median_ms": median,
                     "iqr_ms": iqr})
    ratios = [t / c for t, c in zip(times["torch"], times["cpp"])]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    summary = {"name": name, "pairs": pairs, "ratio_median": median, "ratio_q1": q1, "ratio_q3": q3,
               "cpp_faster_fraction": sum(r > 1.0 for r in ratios) / len(ratios),
               "torch_ms": times["torch"], "cpp_ms": times["cpp"]}
    return rows, summary


def speedups(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(name, pass, torch median / cpp median) for each op and pass."""
    by_key = {(r["name"], r["pass"], r["backend"]): r["median_ms"] for r in rows}
    return [(name, which, by_key[(name, which, "torch")] / by_key[(name, which, "cpp")])
            for (name, which, backend) in by_key if backend == "cpp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: perf_counter (default); cpu: process_time, for --threads 1 on a loaded machine")
    parser.add_argument("--train", action="store_true", help="also time an mnist-preset training step (slow)")
    parser.add_argument("--pairs", type=int, default=30, help="interleaved pairs of training steps (with --train)")
    parser.add_argument("--json", default=None, help="also write every row and the pairs' summary to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, load average {os.getloadavg()[0]:.1f}")
    rows, summary = bench_cpp_ops(args.quick, args.clock), None
    if args.train:
        train_rows, summary = bench_train_step(args.quick, args.clock, pairs=args.pairs)
        rows += train_rows
    for r in rows:
        print(f"{r['section']:12s} {r['name']:55s} {r['backend']:6s} {r['pass']:8s} "
              f"{r['median_ms']:9.3f} ms  (IQR {r['iqr_ms']:.3f})")
    print("# speed-up of cpp over torch (ratio of medians)")
    for name, which, ratio in speedups(rows):
        print(f"{name:55s} {which:8s} {ratio:6.2f}x")
    if summary is not None:
        print(f"# {summary['name']}: per-pair ratio torch / cpp over {summary['pairs']} pairs: median "
              f"{summary['ratio_median']:.3f}x (quartiles {summary['ratio_q1']:.3f} to {summary['ratio_q3']:.3f}); "
              f"cpp faster in {summary['cpp_faster_fraction']:.0%} of the pairs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                       "rows": rows, "train_pairs": summary}, f, indent=1)


if __name__ == "__main__":
    main()
