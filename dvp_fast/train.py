"""The training loop, one for both ways in: `dvp-train` (dvp_fast/train_cli.py, a run folder) and the
Python `fit(model, images)` (results in memory). Flags choose what happens around the step; the steps,
logging, evaluation, checkpoints and stops are this one loop:

    for each batch:  trainer.step(x)                          # no host sync (dvp_fast/trainer.py)
                     every log_every steps:  read the metrics  -> outputs.log(row)
                     every eval_every steps: evaluate the EMA  -> outputs.evaluated(...), best.pt
                     every checkpoint_every steps:              -> last.pt
                     a SIGTERM/SIGINT seen:  last.pt, then Stopped

Training randomness starts at the seed (`TrainConfig.seed` + rank) when the loop starts at step 0,
however the model was built, so the same seed gives the same losses through both ways in.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from . import checks
from . import data as datasets
from .checkpoint import BEST, LAST
from .config import PRESETS, TrainConfig, train_preset
from .evaluation import evaluate
from .model import DVPVAE
from .rng import seed_everything, set_rng_state
from .run_folder import Stopped
from .trainer import Trainer, resolve_precision

MAX_CONSECUTIVE_SKIPS = 50  # non-finite steps in a row after which the run is called diverged

__all__ = ["Schedule", "Position", "LoopResult", "train_loop", "fit", "evaluate"]


@dataclass
class Schedule:
    """How long to train and how often to read metrics, evaluate and checkpoint (in steps)."""

    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int | None = None  # None: no checkpoints


@dataclass
class Position:
    """Where training stands: steps taken, the next batch (epoch, index in it), the best validation loss,
    and on a resume the RNG states saved with it."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    best: float = math.inf
    best_step: int | None = None
    rng: dict | None = field(default=None, repr=False)

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.batch_index += 1
        if self.batch_index >= steps_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0


@dataclass
class LoopResult:
    steps: int
    best_val_loss: float
    best_step: int | None
    train_loss: float  # bits/dim, mean of the last logging interval
    train_steps: int  # the steps that mean is over
    last_eval: dict  # evaluate()'s result at the last evaluation ({} if none)
    skipped: int  # non-finite steps skipped over the whole run
    seconds: float


class Outputs:
    """Where the loop reports; the base keeps nothing. dvp-train's RunFolder writes files, fit's History
    keeps the rows."""

    def log(self, row: dict) -> None:
        pass

    def evaluated(self, step: int, model: DVPVAE, val_images: torch.Tensor, result: dict) -> None:
        pass

    def checkpoint(self, name: str, position: Position) -> None:
        pass

    def stopped(self, signum: int, step: int) -> Stopped:
        """The exception that ends a run stopped by signal `signum` after `step`."""
        return Stopped(signum, f"stopped by {signal.Signals(signum).name} after step {step}")


def train_loop(trainer: Trainer, batches: datasets.DeviceBatches, val_images: torch.Tensor, schedule: Schedule,
               outputs: Outputs, *, start: Position | None = None, rank: int = 0, world: int = 1,
               eval_ema: bool = True, stop=None, progress: bool = True, name: str = "dvp_fast",
               desc: str | None = None) -> LoopResult:
    """Train `trainer.model` from `start` (default: step 0) to `schedule.total_steps`.

    `rank`/`world`: this process's share of each batch under DDP (only rank 0 evaluates, logs and
    checkpoints). `eval_ema`: evaluate the EMA weights (else the raw ones). `stop`: an object whose
    `signum` turns non-None on a stop request (dvp_fast.run_folder.StopRequests). `name` starts the
    loop's messages, `desc` (default: `name`) labels the progress bar.
    """
    model, cfg, steps_per_epoch = trainer.model, trainer.cfg, len(batches)
    is_main = rank == 0
    pos = start or Position()
    _start_rng(cfg.seed, rank, pos)
    from tqdm import tqdm

    bar = tqdm(total=schedule.total_steps, initial=pos.step, desc=desc or name, unit="step", dynamic_ncols=True,
               file=sys.stderr, disable=not (progress and is_main))
    interval = _Interval(name, pos.step, int(trainer.state.skipped.item()))
    started, last_train, last_eval = time.time(), (math.nan, 0), {}
    model.train()
    try:
        while pos.step < schedule.total_steps:
            for x in batches.batches(pos.epoch, start=pos.batch_index):
                if world > 1:
                    x = x[rank::world]
                trainer.step(x)
                pos.advance(steps_per_epoch)
                step, done = pos.step, pos.step >= schedule.total_steps
                row = None
                if step % schedule.log_every == 0 or done:
                    row = interval.read(trainer, step, steps_per_epoch, started, bar if is_main else None)
                    last_train = (row["loss"], interval.steps)
                if is_main and (step % schedule.eval_every == 0 or done):
                    last_eval = _evaluate(trainer, val_images, outputs, step, eval_ema)
                    row = {**(row or dict(step=step, epoch=step / steps_per_epoch)),
                           **{k: v for k, v in last_eval.items() if k != "layers"}}
                    if last_eval["val_loss"] < pos.best:
                        pos.best, pos.best_step = last_eval["val_loss"], step
                        outputs.checkpoint(BEST, pos)
                if is_main and row is not None:
                    outputs.log(row)
                every = schedule.checkpoint_every
                if is_main and every and (step % every == 0 or done):
                    outputs.checkpoint(LAST, pos)
                if stop is not None and stop.signum is not None and not done:
                    if is_main and every and step % every:
                        outputs.checkpoint(LAST, pos)
                    raise outputs.stopped(stop.signum, step)
                bar.update(1)
                if done:
                    break
    finally:
        bar.close()
    return LoopResult(steps=pos.step, best_val_loss=pos.best, best_step=pos.best_step, train_loss=last_train[0],
                      train_steps=last_train[1], last_eval=last_eval, skipped=int(trainer.state.skipped.item()),
                      seconds=time.time() - started)


def _start_rng(seed: int, rank: int, pos: Position) -> None:
    """A fresh run draws from the seed; a resumed one continues rank 0's saved RNG stream exactly (other
    ranks reseed, apart from each other and from their earlier streams)."""
    if pos.step == 0:
        seed_everything(seed + rank)
    elif rank == 0 and pos.rng is not None:
        set_rng_state(pos.rng)
    else:
        seed_everything(seed + rank + 7919 * pos.step)


class _Interval:
    """The metrics of one logging interval: the trainer's device-side sums (one sync) and the throughput."""

    def __init__(self, name: str, step: int, skipped: int):
        self.name = name
        self.start_step, self.start_time, self.skipped_seen, self.steps = step, time.perf_counter(), skipped, 0

    def read(self, trainer: Trainer, step: int, steps_per_epoch: int, started: float, bar) -> dict:
        m = trainer.read_metrics()
        self.steps = step - self.start_step
        ips = self.steps * trainer.cfg.batch_size / max(time.perf_counter() - self.start_time, 1e-9)
        self.start_step, self.start_time = step, time.perf_counter()
        if m["skipped"] > self.skipped_seen and bar is not None:
            bar.write(f"{self.name}: step {step}: skipped {m['skipped'] - self.skipped_seen} step(s) with a non-finite "
                      f"loss or gradient ({m['skipped']} in total)", file=sys.stderr)
            self.skipped_seen = m["skipped"]
        if m["consecutive"] >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(f"training diverged: the last {m['consecutive']} steps (up to step {step}) had a "
                               f"non-finite loss or gradient and were skipped; lower --lr (it is "
                               f"{trainer.cfg.lr:g}) or check the data; re-running resumes from the last checkpoint")
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}bpd", nats=f"{-m['elbo']:.2f}", img_s=f"{ips:.0f}",
                            skipped=m["skipped"], refresh=False)
        return dict(step=step, epoch=step / steps_per_epoch, lr=trainer.scheduler.get_last_lr()[0], loss=m["loss"],
                    elbo=m["elbo"], recon=m["recon"], kl=m["kl"], grad_norm=m["grad_norm"], skipped=m["skipped"],
                    images_per_s=ips, time_s=time.time() - started)


def _evaluate(trainer: Trainer, val_images: torch.Tensor, outputs: Outputs, step: int, eval_ema: bool) -> dict:
    """Evaluate the EMA (or raw) weights on the validation images; the RNG streams of training are left as
    they were, so evaluating more or less often never changes the training itself."""
    model = trainer.model
    trainer.ema.sync_buffers(model)
    target = trainer.ema.model if eval_ema else model
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        result = evaluate(target, val_images, trainer.cfg.eval_batch_size, trainer.precision)
        outputs.evaluated(step, target, val_images, result)
    return result


# --- the Python API: train on a uint8 tensor ------------------------------------------------------------------
class History(Outputs):
    """fit's outputs: the logged rows, in memory."""

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)


def fit(model: DVPVAE, images: torch.Tensor, *, val_images: torch.Tensor | None = None, epochs: float | None = None,
        max_steps: int | None = None, batch_size: int | None = None, lr: float | None = None, seed: int = 0,
        precision: str = "auto", use_ema: bool = True, progress: bool = True) -> dict:
    """Train `model` in place on uint8 `images` (N, C, H, W) with dvp-train's loop, without a run folder.

    The optimiser, schedule, clipping and EMA are the model's preset's (`batch_size`, `lr`
    override them); it trains for `max_steps`, else `epochs` (default: the preset's). The
    DCT normaliser S is fitted on the training images first if it is not yet. `val_images`
    default to a `seed`-drawn 10% of `images` (the rest is trained on). At the end the model
    holds the EMA weights (`use_ema=False` keeps the raw ones) and is in eval mode. Returns
    dict(steps, train_loss (bits/dim, mean of the last epoch), val_loss, val_elbo, active_units,
    layers, history: one row per epoch).
    """
    cfg = model.config
    checks.uint8_images(images, cfg, "images")
    if val_images is None:
        train_images, val_images = (datasets.user_split(images, seed, split) for split in ("train", "val"))
    else:
        train_images, val_images = images, checks.uint8_images(val_images, cfg, "val_images")
    overrides = {k: v for k, v in dict(batch_size=batch_size, lr=lr, seed=seed).items() if v is not None}
    tcfg = train_preset(cfg.name, **overrides) if cfg.name in PRESETS else TrainConfig(**overrides)
    if model.pseudo is not None and cfg.pseudoinput_type == "dct" and not bool(model.pseudo.scale_fitted):
        model.fit_pseudoinput_scale(train_images)
    batches = datasets.DeviceBatches(train_images, tcfg.batch_size, model.device, seed=seed)
    total = max_steps or max(1, int(round((epochs or tcfg.epochs) * len(batches))))
    schedule = Schedule(total_steps=total, log_every=len(batches), eval_every=total)
    trainer = Trainer(model, tcfg, len(batches), resolve_precision(precision, model.device))
    history = History()
    validate, model.validate_inputs = model.validate_inputs, False  # uint8 converted on the device is in range
    try:
        result = train_loop(trainer, batches, val_images, schedule, history, eval_ema=use_ema, progress=progress,
                            name="dvp_fast.fit")
    finally:
        model.validate_inputs = validate
    if use_ema:
        model.load_state_dict(trainer.ema.model.state_dict())
    model.eval()
    return dict(steps=result.steps, train_loss=result.train_loss, history=history.rows, **result.last_eval)


if __name__ == "__main__":  # python -m dvp_fast.train / torchrun -m dvp_fast.train: the dvp-train command
    from dvp_fast.train_cli import main

    sys.exit(main())
