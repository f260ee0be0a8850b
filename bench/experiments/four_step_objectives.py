"""The 4-step student's outlying samples: objectives that see them.

    python bench/experiments/four_step_objectives.py --checkpoint runs/mnist-full/distilled.pt \
        --data-dir ../shared/data/mnist [--arms ...]

bench/experiments/four_step_tail.py found that about 1 % of the 4-step student's samples lie further from
real pseudo-inputs than any of the teacher's, and that no variant of the recipe's data, length, grid or
parameterisation removes them. A reason the energy distance cannot: for a sample far from both the teacher's
samples and the student's others, its pull towards the targets (the mean unit vector to them) and its push
from the student's others (the mean unit vector to those) point the same way and cancel, so the loss hardly
moves a far sample; the moment term sees it only through its share of the covariance. This fits 4-step
students, as four_step_tail.py does (seed 1004, from the checkpoint's 8-step student, 400 iterations of batch
256 on the first 16,384 of its pool of 65,536 teacher samples drawn after torch.manual_seed(20), energy distance
plus the moment term), with a term added that does see far samples:

- "reverse KL": distill.FakeScore's term, the gradient of KL(student || teacher) of distribution matching
  distillation (Yin et al., DMD, 2024): for student samples u noised to z_t (t ~ U(0.02, 0.98)), the difference
  between the x a second ("fake") network fitted to the student's own samples denoises z_t to and the x the
  teacher denoises it to, normalised per sample by the teacher's mean absolute error |u - x_real|; the fake starts
  as the teacher's network and takes one Adam step (or, where said, three) of the diffusion loss on each batch of
  student samples. Reverse KL is large where the student puts mass and the teacher has little: the outlying
  samples. With one fake step, the arm is distill_one(reverse_kl_weight=weight), what dvp-distill runs;
- "sliced W2": the squared 2-Wasserstein distance of the batch and a batch of targets along 64 random
  directions (sorted and matched one to one, so a far sample is matched to the furthest targets and pulled
  by its whole distance).
`recipe as is` (distill_one without the term) repeats four_step_tail.py's arm of that name (its numbers must be equal).
Measured as four_step_tail.py does (its `tail` and `runs`); `--table` writes the Markdown table of the results.
"""
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_quality import experiment_args, experiment_parser, load_experiment  # noqa: E402
from four_step_tail import runs, tail, write_table  # noqa: E402

from dvp_fast.distill import (FakeScore, distill_one, energy_distance, moment_mismatch, student_sample,  # noqa: E402
                              teacher_samples)


def sliced_w2(x, y, generator, directions: int = 64):
    """Mean over random unit directions of the squared 1-d 2-Wasserstein distance of x's and y's projections."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    d = torch.randn(x.shape[1], directions, generator=generator)
    d = d / d.norm(dim=0, keepdim=True)
    return ((x @ d).sort(0).values - (y @ d).sort(0).values).pow(2).mean(0).mean()


def fit(prior, init, pool, batch_size, term, iterations=400, lr=3e-4, seed=1004):
    """The 4-step student of one arm. Without a term, or with the reverse-KL term and one fake update per iteration,
    that is distill.distill_one's (reverse_kl_weight 0 or the term's weight); otherwise distill_one's loop (the same
    draws in the same order) with ("reverse KL", weight, fake updates per iteration) or ("sliced W2", weight)."""
    kind, weight, *more = term or (None, 0.0)
    if kind is None or (kind == "reverse KL" and not more):
        return distill_one(prior, 4, pool, iterations, batch_size, lr, init, seed=seed, reverse_kl_weight=weight)[0]
    student = copy.deepcopy(init).eval()
    for p in student.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
    generator = torch.Generator().manual_seed(seed)
    term_generator = torch.Generator().manual_seed(seed + 1)  # as distill_one's FakeScore draws
    flat = pool.flatten(1).float()
    mean, cov = flat.mean(0), torch.cov(flat.T)
    fake = FakeScore(prior, term_generator) if kind == "reverse KL" else None
    for _ in range(iterations):
        rows = torch.randint(0, pool.shape[0], (batch_size,), generator=generator)
        u = student_sample(prior, student, batch_size, 4, generator, "eps")
        loss = energy_distance(u, pool[rows]) + moment_mismatch(u, mean, cov)
        if fake is not None:
            loss = loss + weight * fake.term(u)
        else:
            loss = loss + weight * sliced_w2(u, pool[rows], term_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        for _ in range(more[0] if fake is not None else 0):
            fake.fit(u)
    return student


ARMS = {  # name: (batch size, term)
    "recipe as is": (256, None),
    **{f"reverse KL, weight {w}": (256, ("reverse KL", w)) for w in (0.01, 0.03, 0.1, 0.3, 1)},
    "reverse KL, weight 0.1, 3 fake updates": (256, ("reverse KL", 0.1, 3)),
    "sliced W2, weight 1": (256, ("sliced W2", 1.0)),
}


def teacher_pool(prior, cache: str | None) -> torch.Tensor:
    """four_step_tail.py's pool: 65,536 teacher samples after torch.manual_seed(20) (cached in `cache`)."""
    if cache and os.path.exists(cache):
        return torch.load(cache)
    torch.manual_seed(20)
    pool = teacher_samples(prior, 65536)
    if cache:
        torch.save(pool, cache)
    return pool


def main():
    p = experiment_parser(__doc__, write_table)
    p.add_argument("--out", default="bench/results/distill-four-step-objectives.json")
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), help="the arms to fit (default: all)")
    p.add_argument("--pool-cache", default=None, help="a file to keep the teacher pool in between calls")
    p.add_argument("--save-dir", default=None, help="a folder to save each fitted student's network in")
    args = experiment_args(p)
    model, references = load_experiment(args)
    prior = model.u_prior
    val = references["val"].u.flatten(1).double()
    start = time.time()
    pool = teacher_pool(prior, args.pool_cache)[:16384]
    print(f"pool ready in {time.time() - start:.0f} s", flush=True)
    results = {}
    for name in args.arms or ARMS:
        batch_size, term = ARMS[name]
        start = time.time()
        student = fit(prior, model.u_students["8"], pool, batch_size, term)
        fitted = time.time() - start
        if args.save_dir:
            os.makedirs(args.save_dir, exist_ok=True)
            file = name.replace(" ", "_").replace(",", "") + ".pt"
            torch.save(student.state_dict(), os.path.join(args.save_dir, file))

        def sample(n, s=student):
            return student_sample(prior, s, n, 4)
        with torch.no_grad():
            torch.manual_seed(7)
            results[f"refitted 4-step student, {name}"] = row = dict(tail(sample(10000), val),
                                                                    runs=runs(sample, references))
        row["fit_seconds"] = round(fitted, 1)
        print(name, json.dumps(row), flush=True)
        with open(args.out, "w") as f:  # after each arm: a long call stopped early keeps what it measured
            json.dump(dict(checkpoint=args.checkpoint, torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
