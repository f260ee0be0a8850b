"""dvp-sample and dvp-eval: draw sample grids from, and evaluate, a trained DVP-VAE.

    dvp-sample --checkpoint runs/mnist --n 64 --out grid.png [--steps 50] [--temperature 0.8] [--seed 1]
    dvp-eval --checkpoint runs/mnist [--data mnist --data-dir ~/mnist] [--num-samples 1000]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch

from . import data as datasets
from .atomic import atomic_write, atomic_write_bytes
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .diffusion import DiffusionPrior
from .images import save_grid
from .model import DVPVAE

# Errors that describe bad input or a faulty environment: shown as one line without a traceback.
# Anything else is a bug: also one line, but labelled as such and pointing to --debug.
EXPECTED_ERRORS = (ValueError, TypeError, RuntimeError, OSError, CheckpointError, NotImplementedError)
_MAX_MESSAGE = 2000
EVALUATIONS = "evaluations.json"  # dvp-eval's results, next to the checkpoint they were computed from


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line on stderr (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """Collapse a message onto one line (compiler output, torch's multi-line errors), cut to a sane length."""
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " ... (--debug shows all)"


def report_error(prog: str, exc: BaseException) -> int:
    """Print `exc` as one line on stderr; returns the exit code (2 for expected errors, 1 for bugs)."""
    if isinstance(exc, EXPECTED_ERRORS):
        message = str(exc)
        if isinstance(exc, OSError) and exc.strerror:  # drop the "[Errno 28] " prefix, keep the file name
            message = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
        return 2
    print(f"{prog}: internal error: {type(exc).__name__}: {one_line(exc)} (re-run with --debug for the traceback)",
          file=sys.stderr)
    return 1


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but no CUDA device is available")
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: time the conv algorithms once
        return torch.device("cuda")
    return torch.device("cpu")


def _run(prog: str, fn, args) -> int:
    try:
        fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        return report_error(prog, exc)
    return 0


def data_argument(text: str) -> str:
    """argparse type of --data (every command that takes it): a dataset name or a user source."""
    try:
        return datasets.check_data_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least_zero(kind, allow_zero: bool):
    """An argparse type: `kind(text)`, refused unless > 0 (or >= 0 with `allow_zero`)."""
    def parse(text: str):
        value = kind(text)
        if not (value >= 0 if allow_zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if allow_zero else '>'} 0, got {text}")
        return value

    return parse


def _positive(kind):
    return _at_least_zero(kind, allow_zero=False)


def _non_negative(kind):
    return _at_least_zero(kind, allow_zero=True)


def _progress(args, total: int, desc: str, unit: str):
    """A tqdm bar on stderr with the time left (or a silent stand-in with --no-progress)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=total >= 10_000, dynamic_ncols=True, file=sys.stderr,
                disable=args.no_progress, mininterval=1.0)


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
    chunks = []
    with _progress(args, total=args.n, desc="dvp-sample", unit="image") as bar:
        for first in range(0, args.n, args.batch_size):
            k = min(args.batch_size, args.n - first)
            # On a GPU the whole sampler replays as one CUDA graph per batch size (captured once).
            chunks.append(model.sample(k, temperature=args.temperature, steps=args.steps,
                                       compile=device.type == "cuda"))
            bar.update(k)
    images = torch.cat(chunks)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    save_grid(images, args.out, nrow=args.nrow, scale=args.scale)
    if args.save_tensor:
        atomic_write(os.path.splitext(args.out)[0] + ".pt", lambda f: torch.save(images.cpu(), f))
    steps = args.steps or model.config.sample_steps
    used = model.sampler_for(steps) if isinstance(model.u_prior, DiffusionPrior) else None
    how = {"student": f"the {steps}-step distilled student", "ancestral": f"{steps} ancestral steps"}.get(used)
    print(f"dvp-sample: {args.n} samples in {elapsed:.2f} s -> {args.out}" + (f" (u: {how})" if how else ""))


def sample_main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="dvp-sample", description="Draw a PNG grid of samples from a DVP-VAE.")
    p.add_argument("--checkpoint", required=True, help="run folder (uses best.pt) or a .pt file")
    p.add_argument("--n", type=_positive(int), default=64, help="number of samples")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--steps", type=_positive(int), default=None, help="diffusion steps for u (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="multiplies every latent's variance")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--nrow", type=_positive(int), default=None, help="images per grid row")
    p.add_argument("--scale", type=_positive(int), default=2,
                   help="draw each image pixel as SCALE x SCALE pixels (default 2; 1: the images' own size)")
    p.add_argument("--save-tensor", action="store_true", help="also save the raw (n, C, H, W) tensor as .pt")
    p.add_argument("--batch-size", type=_positive(int), default=500, help="images drawn at once")
    p.add_argument("--raw-weights", action="store_true", help="use the training weights, not their EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if not 0 <= args.temperature < math.inf:
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    return _run("dvp-sample", sample, args)


# --- dvp-eval -----------------------------------------------------------------------------------------
def load_run(checkpoint: str, device: torch.device, raw_weights: bool = False) -> tuple[str, dict, DVPVAE]:
    """(the .pt file, its payload, its model in eval mode on `device`) of a run folder (best.pt, else last.pt)
    or a .pt file: the EMA weights unless `raw_weights`."""
    path = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(path)
    model = DVPVAE.from_checkpoint_payload(payload, path, ema=not raw_weights).to(device).eval()
    return path, payload, model


def run_images(payload: dict, path: str, model: DVPVAE, data: str | None, split: str | None,
               root: str | None = None, download: bool = False,
               default_split: str = "test") -> tuple[str, str, torch.Tensor]:
    """(dataset, split, uint8 images) to evaluate a checkpoint on: `data`, else the data it was trained on;
    `split`, else `default_split` (for a user's images "all" where the default is "test"). A user source's val
    split is drawn with the run's seed: the same images dvp-train validated on."""
    name = data or payload.get("run", {}).get("data")
    if name is None:
        raise ValueError(f"{path} does not record its dataset: pass --data")
    if split is None:
        split = "all" if datasets.is_user_source(name) and default_split == "test" else default_split
    seed = payload.get("train_config", {}).get("seed", 0)
    images = datasets.load_images(name, split, root=root, download=download, seed=seed)
    cfg = model.config
    if tuple(images.shape[1:]) != (cfg.image_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"{name}: images of shape {tuple(images.shape[1:])}, the model of {path} expects "
                         f"{(cfg.image_channels, cfg.image_size, cfg.image_size)} (images are not resized)")
    return name, split, images


def evaluate(args: argparse.Namespace) -> dict:
    device = _device(args.device)
    path, payload, model = load_run(args.checkpoint, device, raw_weights=args.raw_weights)
    name, split, images = run_images(payload, path, model, args.data, args.split, args.data_dir, args.download,
                                     default_split="test")
    if args.limit is not None:
        images = images[:args.limit]
    cfg = model.config
    if args.seed is not None:
        torch.manual_seed(args.seed)
    bpd = 1.0 / (cfg.pixels * math.log(2.0))
    neg_elbo = nll = nll_sq = 0.0
    start = time.perf_counter()
    batches = datasets.DeviceBatches(images, min(args.batch_size, images.shape[0]), device, shuffle=False,
                                     drop_last=False)
    model.validate_inputs = False  # uint8 data converted on the device is in range by construction
    n = images.shape[0]
    bar = _progress(args, total=n * args.num_samples, desc="dvp-eval IWAE", unit="draw")
    with torch.no_grad(), bar:
        for x in batches.batches(0):
            neg_elbo += (-model(x).elbo).sum().item()
            per_image = model.nll(x, num_samples=args.num_samples, progress=bar.update).double()
            nll += per_image.sum().item()
            nll_sq += per_image.pow(2).sum().item()
    au = model.active_units(images.to(device).float() / 127.5 - 1.0, batch_size=args.batch_size)
    # The standard error of the mean over images (the estimate's spread across the test set).
    stderr = math.sqrt(max(nll_sq / n - (nll / n) ** 2, 0.0) / max(n - 1, 1))
    result = dict(images=n, neg_elbo=neg_elbo / n, nll=nll / n, nll_stderr=stderr, active_units=au,
                  seconds=time.perf_counter() - start)
    print(f"dvp-eval: {name}/{split}, {n} images, {args.num_samples} importance samples")
    print(f"  negative ELBO  {result['neg_elbo']:.3f} nats  {result['neg_elbo'] * bpd:.4f} bits/dim")
    print(f"  IWAE NLL       {result['nll']:.3f} ± {stderr:.3f} nats  {result['nll'] * bpd:.4f} bits/dim "
          f"(± one standard error over the images)")
    print(f"  active units   {au:.1%}")
    print(f"  time           {result['seconds']:.1f} s")
    record = dict(checkpoint=os.path.basename(path), checkpoint_sha256=file_sha256(path), step=payload.get("step"),
                  ema=not args.raw_weights, data=name, split=split, limit=args.limit, num_samples=args.num_samples,
                  seed=args.seed, bits_per_dim=result["nll"] * bpd, date=time.strftime("%Y-%m-%d"), **result)
    record_evaluation(os.path.dirname(path), record)
    return result


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_evaluations(folder: str) -> list[dict]:
    """The records dvp-eval appended to `folder`/evaluations.json (empty if none or unreadable)."""
    try:
        with open(os.path.join(folder, EVALUATIONS), encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def record_evaluation(folder: str, record: dict) -> None:
    """Append `record` to the checkpoint folder's evaluations.json (for dvp-export's model card)."""
    target = os.path.join(folder, EVALUATIONS)
    try:
        atomic_write_bytes(target, json.dumps(read_evaluations(folder) + [record], indent=2).encode("utf-8"),
                           tmp=target + f".tmp{os.getpid()}")
    except OSError as exc:  # a read-only run folder: the result was printed, keep going
        print(f"dvp-eval: note: could not record the result in {target}: {exc.strerror or exc}", file=sys.stderr)


def eval_main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="dvp-eval", description="Test ELBO, IWAE NLL and active units of a DVP-VAE.")
    p.add_argument("--checkpoint", required=True, help="run folder (uses best.pt) or a .pt file")
    p.add_argument("--data", default=None, type=data_argument, metavar="DATA",
                   help=f"{', '.join(datasets.DATASETS)}, folder:PATH, npz:PATH or npy:PATH; default: the data it "
                        f"was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="fetch missing standard dataset files into --data-dir")
    p.add_argument("--split", default=None, choices=datasets.SPLITS + ("all",),
                   help="default: test; for your own images 'all' (train and val are the run's seeded split)")
    p.add_argument("--num-samples", type=_positive(int), default=1000, help="importance samples per image")
    p.add_argument("--batch-size", type=_positive(int), default=100)
    p.add_argument("--limit", type=_positive(int), default=None, help="evaluate the first N images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-weights", action="store_true", help="use the training weights, not their EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return _run("dvp-eval", evaluate, p.parse_args(argv))
