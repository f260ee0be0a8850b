"""dvp-sample and dvp-eval: draw sample grids from, and evaluate, a trained DVP-VAE.

    dvp-sample --checkpoint runs/mnist --n 64 --out grid.png [--steps 50] [--temperature 0.8] [--seed 1]
    dvp-eval --checkpoint runs/mnist [--data mnist --data-dir ~/mnist] [--num-samples 1000]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import data as datasets
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .images import save_grid
from .model import DVPVAE

_EXPECTED_ERRORS = (ValueError, TypeError, RuntimeError, OSError, CheckpointError, NotImplementedError)


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _run(prog: str, fn, args) -> int:
    try:
        fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


# --- dvp-sample -------------------------------------------------------------------------------------
def sample(args: argparse.Namespace) -> None:
    device = _device(args.device)
    model = DVPVAE.from_checkpoint(args.checkpoint, ema=not args.raw_weights).to(device).eval()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output folder does not exist: {out_dir}")
    start = time.perf_counter()
    images = model.sample(args.n, temperature=args.temperature, steps=args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    save_grid(images, args.out, nrow=args.nrow)
    if args.save_tensor:
        torch.save(images.cpu(), os.path.splitext(args.out)[0] + ".pt")
    print(f"dvp-sample: {args.n} samples in {elapsed:.2f} s -> {args.out}")


def sample_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dvp-sample", description="Draw a PNG grid of samples from a DVP-VAE.")
    p.add_argument("--checkpoint", required=True, help="run folder (uses best.pt) or a .pt file")
    p.add_argument("--n", type=_positive(int), default=64, help="number of samples")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--steps", type=_positive(int), default=None, help="diffusion steps for u (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="multiplies every latent's variance")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--nrow", type=_positive(int), default=None, help="images per grid row")
    p.add_argument("--save-tensor", action="store_true", help="also save the raw (n, C, H, W) tensor as .pt")
    p.add_argument("--raw-weights", action="store_true", help="use the training weights, not their EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    return _run("dvp-sample", sample, args)


# --- dvp-eval -----------------------------------------------------------------------------------------
def evaluate(args: argparse.Namespace) -> dict:
    device = _device(args.device)
    path = resolve_checkpoint(args.checkpoint)
    payload = load_checkpoint(path)
    name = args.data or payload.get("run", {}).get("data")
    if name is None:
        raise ValueError(f"{path} does not record its dataset: pass --data")
    model = DVPVAE.from_checkpoint(path, ema=not args.raw_weights).to(device).eval()
    images = datasets.load_images(name, args.split, root=args.data_dir)
    if args.limit is not None:
        images = images[:args.limit]
    cfg = model.config
    if tuple(images.shape[1:]) != (cfg.image_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"dataset {name!r} has images of shape {tuple(images.shape[1:])}, the model expects "
                         f"{(cfg.image_channels, cfg.image_size, cfg.image_size)}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    bpd = 1.0 / (cfg.pixels * math.log(2.0))
    neg_elbo = nll = 0.0
    start = time.perf_counter()
    batches = datasets.DeviceBatches(images, min(args.batch_size, images.shape[0]), device, shuffle=False,
                                     drop_last=False)
    with torch.no_grad():
        for x in batches.batches(0):
            neg_elbo += (-model(x).elbo).sum().item()
            nll += model.nll(x, num_samples=args.num_samples).sum().item()
    n = images.shape[0]
    au = model.active_units(images.to(device).float() / 127.5 - 1.0, batch_size=args.batch_size)
    result = dict(images=n, neg_elbo=neg_elbo / n, nll=nll / n, active_units=au,
                  seconds=time.perf_counter() - start)
    print(f"dvp-eval: {name}/{args.split}, {n} images, {args.num_samples} importance samples")
    print(f"  negative ELBO  {result['neg_elbo']:.3f} nats  {result['neg_elbo'] * bpd:.4f} bits/dim")
    print(f"  IWAE NLL       {result['nll']:.3f} nats  {result['nll'] * bpd:.4f} bits/dim")
    print(f"  active units   {au:.1%}")
    print(f"  time           {result['seconds']:.1f} s")
    return result


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dvp-eval", description="Test ELBO, IWAE NLL and active units of a DVP-VAE.")
    p.add_argument("--checkpoint", required=True, help="run folder (uses best.pt) or a .pt file")
    p.add_argument("--data", default=None, choices=datasets.DATASETS, help="default: the dataset it was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test", choices=datasets.SPLITS)
    p.add_argument("--num-samples", type=_positive(int), default=1000, help="importance samples per image")
    p.add_argument("--batch-size", type=_positive(int), default=100)
    p.add_argument("--limit", type=_positive(int), default=None, help="evaluate the first N images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-weights", action="store_true", help="use the training weights, not their EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return _run("dvp-eval", evaluate, p.parse_args(argv))
