"""What closes the 4-step student's gap to the teacher (bench/results/distill-four-steps-*.md).

    python bench/experiments/distill_four_steps.py --checkpoint runs/mnist-full/distilled.pt \
        --data-dir ../shared/data/mnist

Fits 4-step students from the checkpoint's 8-step student, one per arm (loss, batch, iterations,
teacher-sample pool; with `--pools N1 N2 .. --seeds s1 s2 ..`, the recipe of dvp_fast.distill
fitted to the first N rows of one pool of max(N) teacher samples, once per seed), and scores each,
with the checkpoint's own 4-step student and a second teacher draw as references, on 4000 samples
against 4000 fresh 50-step teacher samples: energy distance (U-statistic), the Frechet (Gaussian)
distance split into its mean and covariance terms, and the V-statistic energy distance of
1000-sample runs to held-out f(x) of the validation split (never trained on) and of the test split.
"""
import json
import os
import sys
import time

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_quality import experiment_args, experiment_parser, load_experiment  # noqa: E402

from dvp_fast.distill import distill_one, energy_distance, student_sample, teacher_samples  # noqa: E402

ARMS = {  # name: (moment_weight, batch_size, iterations, pool rows (None: all), seed)
    "energy distance, batch 256, 400 it": (0.0, 256, 400, None, 4),
    "energy distance + moments, batch 256, 400 it": (1.0, 256, 400, None, 4),
    "energy distance, batch 1024, 100 it": (0.0, 1024, 100, None, 4),
}


def pool_arms(pools: list[int], seeds: list[int]) -> dict:
    """dvp_fast.distill's recipe (energy distance + moments, batch 256, 400 iterations) per pool size and seed."""
    return {f"pool {n}, seed {s}": (1.0, 256, 400, n, s) for n in pools for s in seeds}


def frechet_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum()), float(np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real))


def score(u, teacher, references) -> dict:
    mean_term, cov_term = frechet_terms(u, teacher)
    runs = [u[i * 1000:(i + 1) * 1000] for i in range(u.shape[0] // 1000)]
    return dict(energy_to_teacher=float(energy_distance(u, teacher)), frechet_mean=mean_term, frechet_cov=cov_term,
                energy_to_val=[references["val"].energy_distance(r) for r in runs],
                energy_to_test=[references["test"].energy_distance(r) for r in runs])


def main():
    p = experiment_parser(__doc__)
    p.add_argument("--pool", type=int, default=16384, help="teacher samples the students are fitted to")
    p.add_argument("--pools", type=int, nargs="+", default=None,
                   help="instead of the default arms: the distillation recipe on the first N of max(N) teacher samples")
    p.add_argument("--seeds", type=int, nargs="+", default=[4], help="the fits' seeds (with --pools)")
    p.add_argument("--out", default="bench/results/distill-four-steps.json",
                   help="the results (.json, and a table beside it in .md)")
    p.add_argument("--table-only", action="store_true", help="only rewrite the .md from an existing --out")
    args = experiment_args(p)
    if args.table_only:
        with open(args.out) as f:
            write_table(json.load(f), args.out)
        return
    model, references = load_experiment(args)
    prior = model.u_prior
    arms = ARMS if args.pools is None else pool_arms(args.pools, args.seeds)
    pool_size = args.pool if args.pools is None else max(args.pools)
    start = time.time()
    torch.manual_seed(10)
    pool = teacher_samples(prior, pool_size)
    torch.manual_seed(11)
    teacher, second = teacher_samples(prior, 4000), teacher_samples(prior, 4000)
    print(f"teacher samples drawn in {time.time() - start:.0f} s", flush=True)
    results = {"second teacher draw": score(second, teacher, references)}
    with torch.no_grad():
        torch.manual_seed(12)
        results["checkpoint's 4-step student"] = score(model.sample_pseudoinputs(4000, steps=4, sampler="student"),
                                                       teacher, references)
    print(json.dumps(results, indent=1), flush=True)
    for name, (moment_weight, batch, iterations, rows, seed) in arms.items():
        t0 = time.time()
        student, _ = distill_one(prior, 4, pool[:rows], iterations, batch, 3e-4, model.u_students["8"], seed=seed,
                                 moment_weight=moment_weight, reverse_kl_weight=0.0)  # the arms predate that term
        with torch.no_grad():
            torch.manual_seed(12)
            u = student_sample(prior, student, 4000, 4)
        results[name] = dict(score(u, teacher, references), seconds=round(time.time() - t0))
        print(name, json.dumps(results[name]), flush=True)
    payload = dict(checkpoint=args.checkpoint, pool=pool_size, threads=args.threads, torch=torch.__version__,
                   results=results)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    write_table(payload, args.out)


def write_table(payload: dict, out: str) -> None:
    def span(values):
        return f"{min(values):.4f} to {max(values):.4f} (mean {sum(values) / len(values):.4f})"

    lines = ["# What closes the 4-step student's gap to the teacher", "",
             f"`python bench/experiments/distill_four_steps.py --checkpoint {payload['checkpoint']}`: 4-step students "
             f"fitted from the checkpoint's 8-step student to (the first rows of) a pool of {payload['pool']} fresh "
             "50-step teacher samples (learning rate 3e-4, cosine decay), each scored on 4000 samples against 4000 "
             "other fresh teacher samples. Energy distance to the teacher: U-statistic (0 in expectation for the "
             "teacher itself). Frechet terms: ||mean gap||^2 and the covariance term of the Gaussian Frechet distance. "
             "Energy distance to f(x): V-statistic of each of 4 runs of 1000 samples against all validation "
             "(5,000, never trained on) or test (10,000) images. CPU, 2 threads.", "",
             "| sampler | energy distance to the teacher | Frechet mean term | Frechet covariance term | "
             "to val f(x), 4 runs | to test f(x), 4 runs | s to fit |", "|---|---|---|---|---|---|---|"]
    for name, r in payload["results"].items():
        lines.append(f"| {name} | {r['energy_to_teacher']:.5f} | {r['frechet_mean']:.4f} | {r['frechet_cov']:.4f} | "
                     f"{span(r['energy_to_val'])} | {span(r['energy_to_test'])} | {r.get('seconds', '')} |")
    with open(out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
