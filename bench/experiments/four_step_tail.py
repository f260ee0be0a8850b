"""The 4-step student's outlying samples, and what removes them.

    python bench/experiments/four_step_tail.py --checkpoint runs/mnist-full/distilled.pt \
        --data-dir ../shared/data/mnist

The 4-step student's runs of 1,000 sit further from held-out f(x) than the teacher's, with a larger
run-to-run spread (bench/experiments/run_protocols.py). This measures, for the 50-step teacher, the
checkpoint's 4-step and 8-step students and 4-step students refitted from its 8-step student with
variants of the recipe: the upper quantiles of each sample's distance to its nearest validation f(x)
(10,000 samples; validation f(x) to their own nearest other: the reference), and the V-statistic
energy distance to all validation and all test f(x) of 10 runs of 1,000 (torch.manual_seed(s),
s = 1..10, as bench/distill_quality.py draws them). Variants: the energy distance with exponent
1.5 (|x - y|^1.5: a proper distance still, whose pull on a far sample grows with its distance,
where the exponent 1's is the same for every sample); a teacher pool 4 times larger (65,536);
twice the iterations; no gradient where x_hat is clamped (instead of passing it straight through);
starting from the teacher's network instead of the 8-step student; other time grids t_k = (k / 4)^p,
k = 4..0, instead of the uniform one (p = 1): p = 1.5 (a longer first step, to where x_hat is better
determined: 1 / alpha_t = 3.5 at t = 0.65 against 6.6 at 0.75) and p = 0.67; the network predicting x at
the first step (where the eps student leaves 74 % of x_hat on the clamp) and eps after it; the energy distance
also between each intermediate state z_s of the student and the teacher's marginal there, alpha_s u + sigma_s eps
for teacher samples u (a trajectory off the marginals is pulled back where it leaves them). `--arms` picks some.
"""
import functools
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_quality import experiment_args, experiment_parser, load_experiment, seeded_runs  # noqa: E402

import dvp_fast.distill as distill_module  # noqa: E402
from dvp_fast.diffusion import _sigmoid  # noqa: E402
from dvp_fast.distill import distill_one, teacher_samples  # noqa: E402

QUANTILES = (0.5, 0.99, 0.999)


def energy_distance_exponent(x, y, exponent):
    """distill.energy_distance with |x - y|^exponent (0 < exponent < 2)."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).pow(exponent).mean()
    xx = torch.cdist(x, x).pow(exponent).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).pow(exponent).sum() / (m * (m - 1))
    return 2 * xy - xx - yy


_TRAJECTORY = {}  # the last sample_keeping_states call's intermediate states, for energy_with_marginals


def sample_keeping_states(prior, unet, n, steps, generator=None, predicts="eps", straight_through=True,
                          x_first=False):
    """distill.student_sample, keeping each intermediate z_s (and s) in _TRAJECTORY; with `x_first`, the
    network's output is read as x at the first step (as eps after it)."""
    table = prior.sampler_coefficients(steps, "ancestral", torch.device("cpu"))
    z = torch.randn(n, *prior.shape, generator=generator)
    states = []
    for k in range(steps):
        noise = torch.randn(z.shape, generator=generator)
        z = prior.denoise_step(z, table[k], noise, unet, "x" if x_first and k == 0 else predicts, straight_through)
        if k + 1 < steps:
            states.append((float(table[k + 1][0]), z))
    _TRAJECTORY.update(prior=prior, states=states, generator=generator)
    return z / math.sqrt(_sigmoid(-prior.gamma_min))


x_first_sample = functools.partial(sample_keeping_states, x_first=True)
trajectory_sample = sample_keeping_states


def energy_with_marginals(x, y, exponent=1.0):
    """The energy distance of the final samples plus, for each intermediate z_s of the last trajectory_sample
    call, its energy distance to alpha_s y + sigma_s eps (the teacher's marginal at s, y its samples)."""
    loss = energy_distance_exponent(x, y, exponent)
    prior, generator = _TRAJECTORY["prior"], _TRAJECTORY["generator"]
    for s, z in _TRAJECTORY.pop("states"):
        g = float(prior.gamma(torch.tensor(s, dtype=torch.float64)))
        noisy = math.sqrt(_sigmoid(-g)) * y + math.sqrt(_sigmoid(g)) * torch.randn(y.shape, generator=generator)
        loss = loss + energy_distance_exponent(z, noisy, exponent)
    return loss


def tail(u: torch.Tensor, val: torch.Tensor) -> dict:
    nn = torch.cdist(u.flatten(1).double(), val).min(1).values
    return dict(nn_quantiles=[float(q) for q in torch.quantile(nn, torch.tensor(QUANTILES).double())],
                nn_max=float(nn.max()), beyond_1_5=int((nn > 1.5).sum()))


def runs(sample, references) -> dict:
    draws = seeded_runs(sample, range(1, 11))
    got = {split: [references[split].energy_distance(u) for u in draws] for split in ("val", "test")}
    return {split: dict(mean=statistics.mean(v), sd=statistics.stdev(v), lo=min(v), hi=max(v))
            for split, v in got.items()}


def main():
    p = experiment_parser(__doc__, write_table)
    p.add_argument("--out", default="bench/results/distill-four-step-tail.json")
    p.add_argument("--arms", nargs="+", default=None, help="the variants to fit (default: all)")
    args = experiment_args(p)
    model, references = load_experiment(args)
    prior = model.u_prior
    val = references["val"].u.flatten(1).double()
    loo = torch.cdist(val, val).fill_diagonal_(float("inf")).min(1).values
    results = {"validation f(x), nearest other": dict(
        nn_quantiles=[float(q) for q in torch.quantile(loo, torch.tensor(QUANTILES).double())],
        nn_max=float(loo.max()), beyond_1_5=int((loo > 1.5).sum()) * 2)}  # per 10,000, as the samplers'
    samplers = {"teacher, 50 steps": lambda n: model.sample_pseudoinputs(n, steps=50, sampler="ancestral"),
                "checkpoint's 4-step student": lambda n: model.sample_pseudoinputs(n, steps=4, sampler="student"),
                "checkpoint's 8-step student": lambda n: model.sample_pseudoinputs(n, steps=8, sampler="student")}
    arms = {  # name: exponent, pool, iterations, gradient through the clamp, start from the 8-step student
        "recipe as is": (1.0, 16384, 400, True, True), "exponent 1.5": (1.5, 16384, 400, True, True),
        "pool 65,536": (1.0, 65536, 400, True, True), "800 iterations": (1.0, 16384, 800, True, True),
        "zero gradient where clamped": (1.0, 16384, 400, False, True),
        "from the teacher's network": (1.0, 16384, 400, True, False),
        "time grid power 1.5": (1.0, 16384, 400, True, True, 1.5),
        "time grid power 0.67": (1.0, 16384, 400, True, True, 0.67),
        "x at the first step, eps after": (1.0, 16384, 400, True, True, 1.0, True),
        "intermediate marginals matched too": (1.0, 16384, 400, True, True, 1.0, False, True)}
    arms = {name: arms[name] for name in (args.arms or arms)}
    torch.manual_seed(20)
    start = time.time()
    pool = teacher_samples(prior, max(arm[1] for arm in arms.values()))
    print(f"pool drawn in {time.time() - start:.0f} s", flush=True)
    original = distill_module.energy_distance, distill_module.student_sample
    for name, (exponent, rows, iterations, straight_through, from_eight, *grid) in arms.items():
        start = time.time()
        power = grid[0] if grid else 1.0
        sampler = x_first_sample if len(grid) > 1 and grid[1] else original[1]
        if len(grid) > 2 and grid[2]:
            sampler = trajectory_sample
        times = torch.linspace(1, 0, 5, dtype=torch.float64).pow(power)
        prior.sampler_coefficients = functools.partial(type(prior).sampler_coefficients, prior, times=times)
        distill_module.energy_distance = functools.partial(
            energy_with_marginals if sampler is trajectory_sample else energy_distance_exponent, exponent=exponent)
        distill_module.student_sample = functools.partial(sampler, straight_through=straight_through)
        try:
            student, _ = distill_one(prior, 4, pool[:rows], iterations, 256, 3e-4,
                                     model.u_students["8"] if from_eight else None, seed=1004,
                                     reverse_kl_weight=0.0)  # the recipe these variants vary had no such term
        finally:
            distill_module.energy_distance, distill_module.student_sample = original
            del prior.sampler_coefficients

        def sample(n, s=student, times=times, sampler=sampler):
            prior.sampler_coefficients = functools.partial(type(prior).sampler_coefficients, prior, times=times)
            try:
                return sampler(prior, s, n, 4)
            finally:
                del prior.sampler_coefficients
        samplers[f"refitted 4-step student, {name}"] = sample
        print(f"{name}: fitted in {time.time() - start:.0f} s", flush=True)
    with torch.no_grad():
        for name, sample in samplers.items():
            torch.manual_seed(7)
            results[name] = dict(tail(sample(10000), val), runs=runs(sample, references))
            print(name, json.dumps(results[name]), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(checkpoint=args.checkpoint, quantiles=QUANTILES, torch=torch.__version__, results=results),
                  f, indent=1)


def write_table(paths: list[str], out: str) -> None:
    rows = {}
    for path in paths:
        with open(path) as f:
            rows.update(json.load(f)["results"])
    lines = ["| sampler | distance to nearest val f(x): median | 99 % | 99.9 % | max | beyond 1.5, of 10,000 | "
             "to val f(x), 10 runs: mean (range) | to test f(x): mean (range) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        q, spans = r["nn_quantiles"], ""
        for split in ("val", "test"):
            if "runs" in r:
                got = r["runs"][split]
                spans += f" {got['mean']:.4f} ({got['lo']:.4f} to {got['hi']:.4f}) |"
            else:
                spans += " |"
        cells = [f"{x:.3f}" for x in q] + [f"{r['nn_max']:.2f}", str(r['beyond_1_5'])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |" + spans)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
