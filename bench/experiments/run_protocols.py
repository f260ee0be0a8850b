"""Do runs of 1,000 scored one call per seed (distill_quality.py) agree with runs cut from one large call?

    python bench/experiments/run_protocols.py --checkpoint runs/mnist-full/distilled.pt \
        --data-dir ../shared/data/mnist [--steps 4]

For the 50-step teacher and the k-step student: the V-statistic energy distance to all validation and all
test f(x) of R runs of 1,000, drawn (1) one call per seed with torch.manual_seed(s), s = 1..R, as
bench/distill_quality.py draws them; (2) the same with seeds 101..100+R; (3) cut from one call of R * 1,000
after torch.manual_seed(123). Prints the mean, sd and range of each. If (1) differs from (2) and (3) by
more than their spread allows, the first protocol's seeds are not independent of something.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_quality import held_out_references  # noqa: E402

from dvp_fast import DVPVAE  # noqa: E402


def summary(runs: list[float]) -> str:
    return (f"mean {statistics.mean(runs):.5f}, sd {statistics.stdev(runs):.5f}, "
            f"{min(runs):.5f} to {max(runs):.5f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=4, help="the student's step count")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = DVPVAE.from_checkpoint(args.checkpoint).eval()
    refs = held_out_references(model, args.data_dir)
    n, r = 1000, args.repeats
    for label, steps, sampler in (("teacher, 50 steps", 50, "ancestral"), (f"student, {args.steps} steps",
                                                                           args.steps, "student")):
        draws = {}
        with torch.no_grad():
            for name, seeds in (("seeds 1..R", range(1, r + 1)), ("seeds 101..100+R", range(101, 101 + r))):
                draws[name] = []
                for s in seeds:
                    torch.manual_seed(s)
                    draws[name].append(model.sample_pseudoinputs(n, steps=steps, sampler=sampler))
            torch.manual_seed(123)
            draws["one call, cut"] = list(model.sample_pseudoinputs(n * r, steps=steps, sampler=sampler).split(n))
        for name, runs in draws.items():
            cells = [f"{split} {summary([refs[split].energy_distance(u) for u in runs])}" for split in ("val", "test")]
            print(f"{label}, {name}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
