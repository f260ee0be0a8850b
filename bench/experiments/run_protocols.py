"""Do runs of 1,000 scored one call per seed (distill_quality.py) agree with runs cut from one large call?

    python bench/experiments/run_protocols.py --checkpoint runs/mnist-full/distilled.pt \
        --data-dir ../shared/data/mnist [--steps 4]

For the 50-step teacher and the k-step student: the V-statistic energy distance to all validation and all
test f(x) of R runs of 1,000, drawn (1) one call per seed with torch.manual_seed(s), s = 1..R, as
bench/distill_quality.py draws them; (2) the same with seeds 101..100+R; (3) cut from one call of R * 1,000
after torch.manual_seed(123). Prints the mean, sd and range of each. If (1) differs from (2) and (3) by
more than their spread allows, the first protocol's seeds are not independent of something.
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_quality import experiment_args, experiment_parser, load_experiment, seeded_runs  # noqa: E402


def summary(runs: list[float]) -> str:
    return (f"mean {statistics.mean(runs):.5f}, sd {statistics.stdev(runs):.5f}, "
            f"{min(runs):.5f} to {max(runs):.5f}")


def main():
    p = experiment_parser(__doc__)
    p.add_argument("--steps", type=int, default=4, help="the student's step count")
    p.add_argument("--repeats", type=int, default=10)
    args = experiment_args(p)
    model, refs = load_experiment(args)
    n, r = 1000, args.repeats
    for label, steps, sampler in (("teacher, 50 steps", 50, "ancestral"), (f"student, {args.steps} steps",
                                                                           args.steps, "student")):
        def sample(k, steps=steps, sampler=sampler):
            return model.sample_pseudoinputs(k, steps=steps, sampler=sampler)
        with torch.no_grad():
            draws = {"seeds 1..R": seeded_runs(sample, range(1, r + 1), n),
                     "seeds 101..100+R": seeded_runs(sample, range(101, 101 + r), n)}
            torch.manual_seed(123)
            draws["one call, cut"] = list(sample(n * r).split(n))
        for name, runs in draws.items():
            cells = [f"{split} {summary([refs[split].energy_distance(u) for u in runs])}" for split in ("val", "test")]
            print(f"{label}, {name}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
