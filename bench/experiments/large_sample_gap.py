"""Is the 4-step student's gap to held-out f(x) real, or the noise of 1,000-sample runs?

    python bench/experiments/large_sample_gap.py --checkpoint runs/mnist-full/distilled.pt \
        --data-dir ../shared/data/mnist

Draws 8,000 pseudo-inputs from each of: the 50-step teacher twice, the 4-step and the 8-step student.
Prints (1) the U-statistic energy distance (unbiased, from all 8,000) of each to f(x) of all validation and
all test images and to the first teacher draw, with each sample's mean pairwise distance and norm; and
(2) the V-statistic of distill_quality.py on 8 runs of 1,000 of the same samples (mean, sd, range).
Results are written down in bench/results/distill-2026-12-01-large-samples.md.
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_quality import experiment_args, experiment_parser, load_experiment  # noqa: E402
from sampler_quality import mean_distance  # noqa: E402

from dvp_fast.distill import energy_distance  # noqa: E402


def main():
    p = experiment_parser(__doc__)
    p.add_argument("--n", type=int, default=8000)
    args = experiment_args(p)
    model, refs = load_experiment(args)
    torch.manual_seed(123)
    with torch.no_grad():
        samples = {"teacher, 50 steps": model.sample_pseudoinputs(args.n, steps=50, sampler="ancestral"),
                   "teacher again": model.sample_pseudoinputs(args.n, steps=50, sampler="ancestral"),
                   "student, 4 steps": model.sample_pseudoinputs(args.n, steps=4, sampler="student"),
                   "student, 8 steps": model.sample_pseudoinputs(args.n, steps=8, sampler="student")}
    first = samples["teacher, 50 steps"]
    for name, u in samples.items():
        half = args.n // 4
        to_teacher = "" if u is first else f" | to the first teacher draw {energy_distance(u, first):.5f}"
        print(f"{name}: U-statistic to val {energy_distance(u, refs['val'].u):.5f}, to test "
              f"{energy_distance(u, refs['test'].u):.5f}{to_teacher} | mean pairwise distance "
              f"{mean_distance(u[:half], u[half:2 * half]):.4f}, mean norm {u.flatten(1).norm(dim=1).mean():.4f}")
    for name, u in samples.items():
        for split in ("val", "test"):
            runs = [refs[split].energy_distance(u[i * 1000:(i + 1) * 1000]) for i in range(args.n // 1000)]
            print(f"{name}, {split}: V-statistic of {len(runs)} runs of 1000: mean {statistics.mean(runs):.5f}, "
                  f"sd {statistics.stdev(runs):.5f}, {min(runs):.5f} to {max(runs):.5f}")


if __name__ == "__main__":
    main()
