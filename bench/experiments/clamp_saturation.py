"""How much of x_hat each sampler step puts on the clamp to [-1, 1], overall and for the furthest 1 % of samples.

    python bench/experiments/clamp_saturation.py --checkpoint runs/mnist-full/distilled.pt \
        --data-dir ../shared/data/mnist

For the 4-step and 8-step students and the 50-step teacher: 10,000 samples (torch.manual_seed(7)), the share
of x_hat's coordinates beyond [-1, 1] at each of the first steps, averaged over all samples and over the 1 % whose
nearest validation f(x) is furthest (bench/results/distill-2026-12-02-four-step-tail.md).
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_quality import experiment_args, experiment_parser, load_experiment  # noqa: E402

from dvp_fast.diffusion import _sigmoid  # noqa: E402


def main():
    model, references = load_experiment(experiment_args(experiment_parser(__doc__)))
    val = references["val"].u.flatten(1).double()
    prior = model.u_prior
    for name, unet, steps in (("4-step student", model.u_students["4"], 4),
                              ("8-step student", model.u_students["8"], 8), ("teacher, 50 steps", prior.unet, 50)):
        torch.manual_seed(7)
        table = prior.sampler_coefficients(steps, "ancestral", torch.device("cpu"))
        z, on_clamp = torch.randn(10000, *prior.shape), []
        with torch.no_grad():
            for k in range(steps):
                t, inv_alpha, sigma, coef_z, coef_x, std = table[k].unbind()
                x_raw = (z - sigma * unet(z, t.expand(z.shape[0])).float()) * inv_alpha
                on_clamp.append((x_raw.abs() > 1).flatten(1).double().mean(1))
                z = coef_z * z + coef_x * x_raw.clamp(-1, 1) + std * torch.randn_like(z)
        u = z / math.sqrt(_sigmoid(-prior.gamma_min))
        nearest = torch.cdist(u.flatten(1).double(), val).min(1).values
        far = nearest > torch.quantile(nearest, 0.99)
        print(f"{name}: share of x_hat on the clamp at steps 1 to 4, all samples "
              f"{[round(float(s.mean()), 3) for s in on_clamp[:4]]}, the furthest 1 % "
              f"{[round(float(s[far].mean()), 3) for s in on_clamp[:4]]}")


if __name__ == "__main__":
    main()
