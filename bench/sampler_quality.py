"""What fewer diffusion steps cost: quality proxies of the pseudo-input samplers against steps.

    python bench/sampler_quality.py --checkpoint runs/mnist [--n 500] [--steps 2 5 10 25 50 100]

For each sampler ("ancestral", "ddim") and number of steps, u is drawn from the diffusion
prior and scored with three proxies that need no image metric:
  * prior NLL: the diffusion prior's own variational bound on -log r_hat(u) (nats, a
    T-point grid), i.e. how typical the samples are under the model that drew them;
  * NN distance: mean Euclidean distance from each sample to its nearest held-out
    pseudo-input f(x) of the test split, i.e. how far samples stray from real data;
  * energy distance to the held-out f(x): 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean),
    zero only when the two laws are equal, so it also sees missing variety.
The same numbers for u ~ r(u | x) of validation images give the reference row.
Results go to bench/results/sampler-quality-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from dvp_fast import DVPVAE
from dvp_fast import data as datasets
from dvp_fast.checkpoint import load_checkpoint, resolve_checkpoint


def nn_distance(u: torch.Tensor, reference: torch.Tensor) -> float:
    return torch.cdist(u.flatten(1).double(), reference.flatten(1).double()).min(1).values.mean().item()


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of rows (flattened), in float64."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()).mean().item()


def energy_distance(u: torch.Tensor, reference: torch.Tensor, reference_spread: float | None = None) -> float:
    """Squared energy distance between the two samples' laws (V-statistic, Euclidean);
    `reference_spread` is mean_distance(reference, reference) when it is already known."""
    if reference_spread is None:
        reference_spread = mean_distance(reference, reference)
    return 2 * mean_distance(u, reference) - mean_distance(u, u) - reference_spread


def scores(model, u, held_out, grid: int) -> dict:
    return dict(prior_nll=prior_nll(model, u, grid), nn_distance=nn_distance(u, held_out),
                energy_distance=energy_distance(u, held_out))


@torch.no_grad()
def prior_nll(model: DVPVAE, u: torch.Tensor, grid: int) -> float:
    torch.manual_seed(0)
    return model.u_prior.neg_log_prob(u, grid_steps=grid).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 100])
    p.add_argument("--grid", type=int, default=50, help="grid points of the prior NLL bound")
    p.add_argument("--raw-weights", action="store_true",
                   help="the training weights instead of their EMA (for short runs, where the EMA still lags)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    path = resolve_checkpoint(args.checkpoint)
    payload = load_checkpoint(path)
    name = args.data or payload["run"]["data"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DVPVAE.from_checkpoint(path, ema=not args.raw_weights).to(device).eval()
    test = datasets.load_images(name, "test", root=args.data_dir)[: 4 * args.n].to(device).float() / 127.5 - 1
    val = datasets.load_images(name, "val", root=args.data_dir)[: args.n].to(device).float() / 127.5 - 1
    held_out = model.pseudo.mean(test)

    rows = []
    torch.manual_seed(0)
    u_data = model.pseudo.sample(model.pseudo.mean(val))[0]
    rows.append(dict(sampler="data: u ~ r(u|x)", steps=None, seconds=None, **scores(model, u_data, held_out, args.grid)))
    for sampler in ("ancestral", "ddim"):
        for steps in args.steps:
            torch.manual_seed(1)
            start = time.perf_counter()
            u = model.u_prior.sample(u_data.shape[0], steps=steps, sampler=sampler, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows.append(dict(sampler=sampler, steps=steps, seconds=time.perf_counter() - start,
                             **scores(model, u, held_out, args.grid)))
            print(rows[-1], flush=True)
    # Run-to-run spread: the longest ancestral setting again with other draws.
    torch.manual_seed(2)
    u = model.u_prior.sample(u_data.shape[0], steps=max(args.steps), sampler="ancestral", device=device)
    rows.append(dict(sampler="ancestral, other draws", steps=max(args.steps), seconds=None,
                     **scores(model, u, held_out, args.grid)))

    meta = dict(checkpoint=path, step=payload.get("step"), weights="raw" if args.raw_weights else "EMA", data=name, n=u_data.shape[0], grid=args.grid,
                device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)",
                torch=torch.__version__, date=datetime.date.today().isoformat())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"sampler-quality-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    lines = ["# Pseudo-input sampler quality against steps", "",
             f"Checkpoint `{path}` (step {meta['step']}, {meta['weights']} weights, data {name}), {meta['n']} samples, "
             f"prior NLL on a "
             f"{args.grid}-point grid; {meta['device']}, torch {meta['torch']}, {meta['date']}.", "",
             "Lower is better for every proxy; the first row is real pseudo-inputs u ~ r(u|x) of validation images.", "",
             "| sampler | steps | prior NLL (nats) | NN distance to held-out u | energy distance to held-out u | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.3f}"
        lines.append(f"| {r['sampler']} | {r['steps'] or ''} | {r['prior_nll']:.2f} | {r['nn_distance']:.4f} | "
                     f"{r['energy_distance']:.4f} | {secs} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
