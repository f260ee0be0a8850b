"""dvp-figures: the paper's figures from a trained run, as labelled PNGs with the numbers behind each as CSV.

    dvp-figures --checkpoint runs/mnist --out figures/ [--compare runs/mnist-no-agg] [--only pseudo recon]

writes into --out (dvp_fast/figures.py draws each one):
    pseudo_inputs.png/.csv               u ~ r_hat(u) as images, and images decoded from them (Figures 3, 6, 10)
    generative_reconstructions.png/.csv  u ~ r(u|x) (and z_L) fixed, the rest from the prior (Figure 4)
    latent_use.png/.csv                  active units per latent layer, and of --compare's run (Table 4)
    training_curves.png/.csv             gradient norm and bits/dim from the run's metrics.csv (Figures 7, 8)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import figures
from .cli import OneLineParser, _device, _non_negative, _positive, _run, data_argument, load_run, run_images
from .data import SPLITS

FIGURES = {"pseudo": "pseudo_inputs.png", "recon": "generative_reconstructions.png", "latents": "latent_use.png",
           "curves": "training_curves.png"}


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1, got {text!r}") from None
    if any(k < 0 for k in levels):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return levels


def _note(message: str) -> None:
    print(f"dvp-figures: note: {message}", file=sys.stderr)


def make_figures(args: argparse.Namespace) -> dict[str, str]:
    """Draw the figures `args.only` asks for into `args.out`; returns {figure: PNG path} of those written."""
    device = _device(args.device)
    path, payload, model = load_run(args.checkpoint, device, raw_weights=args.raw_weights)
    names = args.only or list(FIGURES)
    if not names:
        return {}
    os.makedirs(args.out, exist_ok=True)
    L = len(model.blocks)
    if any(k > L for k in args.levels):
        raise ValueError(f"--levels: the model has {L} latent layers, so at most {L} can be kept; got "
                         f"{','.join(map(str, args.levels))}")
    images = None
    if {"recon", "latents"} & set(names):
        data, split, images = run_images(payload, path, model, args.data, args.split, args.data_dir,
                                         args.download, default_split="val")
        print(f"dvp-figures: {os.path.basename(path)} ({model.config.image_channels}x{model.config.image_size}x"
              f"{model.config.image_size}, {L} latent layers); images: {data}/{split} ({images.shape[0]})")
    written = {}

    def target(name: str) -> str:
        return os.path.join(args.out, FIGURES[name])

    def start(name: str) -> float:
        torch.manual_seed(args.seed)  # each figure reproducible on its own, whichever others are drawn
        return time.perf_counter()

    def done(name: str, began: float, what: str) -> None:
        written[name] = target(name)
        print(f"dvp-figures: {what} -> {target(name)} (+ .csv, {time.perf_counter() - began:.1f} s)")

    if "pseudo" in names:
        began = start("pseudo")
        if model.pseudo is None:
            _note("this model has no pseudo-inputs (pseudoinputs=False): skipped pseudo_inputs.png")
        else:
            figures.pseudo_input_figure(model, args.n, target("pseudo"), draws=args.draws_per_u,
                                        temperature=args.temperature, steps=args.steps)
            done("pseudo", began, f"{args.n} pseudo-inputs and their decodings")
    if "recon" in names:
        began = start("recon")
        levels = args.levels if model.pseudo is not None else tuple(k for k in args.levels if k > 0) or (1,)
        if levels != args.levels:
            _note(f"this model has no pseudo-inputs: generative reconstructions keep {levels} top latents")
        result = figures.generative_reconstructions(model, images[:args.images], draws=args.draws, levels=levels,
                                                    temperature=args.temperature, out=target("recon"))
        spread = ", ".join(f"{result['labels'][k]}: {result['spread'][k].mean().item():.3f}" for k in levels)
        done("recon", began, f"generative reconstructions of {min(args.images, images.shape[0])} images "
                             f"(pixel spread across draws: {spread})")
    if "latents" in names:
        began = start("latents")
        runs = {_label(path, args.checkpoint): (model, images[:args.au_images])}
        if args.compare is not None:
            other_path, other_payload, other = load_run(args.compare, device, raw_weights=args.raw_weights)
            _, _, other_images = run_images(other_payload, other_path, other, args.data, args.split, args.data_dir,
                                            args.download, default_split="val")
            label = _label(other_path, args.compare)
            if label in runs:
                label += " (compare)"
            runs[label] = (other, other_images[:args.au_images])
        result = figures.latent_use(runs, target("latents"), threshold=args.threshold, batch_size=args.batch_size)
        summary = "; ".join(f"{label}: {sum(v.values()) / len(v):.0%} on average over the layers" for label, v in result.items())
        done("latents", began, f"active units per layer ({summary})")
    if "curves" in names:
        began = start("curves")
        metrics = os.path.join(os.path.dirname(path), "metrics.csv")
        if not os.path.isfile(metrics):
            _note(f"no metrics.csv beside {path}: skipped training_curves.png (it needs a dvp-train run folder)")
        else:
            rows = figures.training_curves(metrics, target("curves"))
            done("curves", began, f"training curves of {len(rows)} logged steps")
    return written


def _label(path: str, given: str) -> str:
    """A run's name in the legend: its folder's name (the .pt file's name too when one was given)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if os.path.isdir(given) else f"{folder}/{os.path.basename(path)}"


def figures_main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="dvp-figures", description="The paper's figures from a trained run: labelled PNGs and "
                                                      "the numbers behind each as CSV.")
    p.add_argument("--checkpoint", required=True, help="run folder (uses best.pt) or a .pt file")
    p.add_argument("--out", required=True, help="folder to write the PNGs and CSVs into (created if needed)")
    p.add_argument("--only", nargs="+", choices=tuple(FIGURES), default=None,
                   help="draw only these figures (default: all four)")
    p.add_argument("--compare", default=None, metavar="RUN2",
                   help="a second run (folder or .pt) whose active units are drawn beside the first's")
    p.add_argument("--data", default=None, type=data_argument, metavar="DATA",
                   help="images for the reconstructions and active units (default: each run's own training data)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="fetch missing standard dataset files into --data-dir")
    p.add_argument("--split", default=None, choices=SPLITS + ("all",), help="default: val (the run's own val split)")
    p.add_argument("--n", type=_positive(int), default=10, help="pseudo-inputs drawn for pseudo_inputs.png")
    p.add_argument("--draws-per-u", type=_positive(int), default=2, help="images decoded from each pseudo-input")
    p.add_argument("--images", type=_positive(int), default=5, help="images in generative_reconstructions.png")
    p.add_argument("--draws", type=_positive(int), default=6, help="decoded draws per image and row")
    p.add_argument("--levels", type=_levels, default=(0, 1),
                   help="top latents kept in each row of the reconstructions, comma-separated (default 0,1: "
                        "u alone, then u and z_L)")
    p.add_argument("--temperature", type=_non_negative(float), default=1.0,
                   help="multiplies the variance of every z drawn from the prior (0: their means)")
    p.add_argument("--steps", type=_positive(int), default=None, help="diffusion steps for u (default: the model's)")
    p.add_argument("--threshold", type=_non_negative(float), default=0.01,
                   help="active-unit threshold on Cov_x(E_q[z]) (the paper's 0.01)")
    p.add_argument("--au-images", type=_positive(int), default=1000, help="images the active units are taken over")
    p.add_argument("--batch-size", type=_positive(int), default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-weights", action="store_true", help="use the training weights, not their EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if not math.isfinite(args.temperature) or not math.isfinite(args.threshold):
        p.error(f"--temperature and --threshold must be finite, got {args.temperature} and {args.threshold}")
    return _run("dvp-figures", make_figures, args)
