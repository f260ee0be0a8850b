"""dvp-train: train a DVP-VAE, resume exactly, log, checkpoint and draw samples.

    dvp-train --preset mnist --out runs/mnist                 # embedded MNIST, any machine
    dvp-train --preset mnist --data mnist --data-dir ~/mnist --out runs/mnist-full
    torchrun --nproc_per_node=2 -m dvp_fast.train --preset cifar10 --data cifar10 --data-dir ~/cifar --out runs/c

The run folder holds last.pt (newest), best.pt (best validation ELBO), metrics.csv,
config.json and samples/*.png. Re-running the same command with the same --out
continues from last.pt: model, EMA, optimiser, schedule, RNG states and the position
in the data, so a resumed CPU run reproduces an uninterrupted one exactly.

The hot loop never waits on the device: metrics are accumulated there and read every
--log-every steps, gradient clipping and non-finite-step skipping happen on device.

Faults: checkpoints are written atomically and verified on load, so a run killed at any
moment (SIGKILL included) resumes from its last complete checkpoint; an unwritable or
nearly full --out is refused before training starts; a failed checkpoint write stops the
run with the previous checkpoint intact; a lock file keeps two runs out of one folder.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import data as datasets
from .checkpoint import (BEST, LAST, CheckpointError, load_checkpoint, remove_stale_temporaries, require_keys,
                         save_checkpoint)
from .cli import OneLineParser, report_error
from .config import PRESETS, DVPConfig, TrainConfig, model_preset, train_preset
from .images import save_grid
from .learning_curve import LayerLog, plot_learning_curve
from .model import DVPVAE
from .ops import backend_available
from .pseudoinput_cache import fit_scale_cached
from .tensorboard_log import TensorBoard, tensorboard_available

METRIC_FIELDS = ["step", "epoch", "lr", "loss", "elbo", "recon", "kl", "grad_norm", "skipped", "images_per_s",
                 "val_loss", "val_elbo", "active_units", "time_s"]
# Default evaluations come once an epoch, but not more often than this: on the 4,000 embedded
# digits an epoch is 16 steps, and evaluating after each would take a third of a short run.
MIN_EVAL_INTERVAL = 50
MAX_CONSECUTIVE_SKIPS = 50  # non-finite steps in a row after which the run is called diverged
RESUME_KEYS = ("model_config", "train_config", "run", "model", "trainer", "step", "epoch", "batch_index", "rng")


# --- schedule, optimiser, EMA ------------------------------------------------------------------------
def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_epochs`, times a cosine from lr to eta_min over `cosine_epochs`."""
    warmup = max(1.0, cfg.warmup_epochs * steps_per_epoch)
    period = max(1.0, cfg.cosine_epochs * steps_per_epoch)
    floor = cfg.eta_min / cfg.lr
    cosine = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step / period, 1.0)))
    return min(1.0, (step + 1) / warmup) * cosine


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adamax (coupled weight decay) over the trainable weights, with its state created up front.

    Creating the moments before the first step lets a skipped first step be undone like
    any other; on CUDA the step counters live on the device (capturable) so nothing syncs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    capturable = params[0].is_cuda
    opt = torch.optim.Adamax(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True, capturable=capturable)
    for p in params:
        step = torch.zeros((), dtype=torch.float32, device=p.device if capturable else "cpu")
        opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_inf": torch.zeros_like(p)}
    return opt


def _foreach_lerp_takes_a_tensor() -> bool:
    """Whether this torch has a _foreach_lerp_ overload whose weight is one tensor (no host sync).

    Calling it is no test: a 0-dim tensor also binds to the Scalar overload, through an
    `.item()` (a host sync on CUDA). So the schemas are read instead.
    """
    schemas = torch._C._jit_get_schemas_for_operator("aten::_foreach_lerp_")
    return any(arg.name == "weight" and str(arg.type) == "Tensor" for schema in schemas for arg in schema.arguments)


_FOREACH_LERP_TAKES_A_TENSOR = _foreach_lerp_takes_a_tensor()


class EMA:
    """Exponential moving average of the trainable weights, updated with one foreach lerp.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (the classic
    TensorFlow ExponentialMovingAverage rule, as in timm and ema-pytorch): at 0.999 from
    the start, the average of a short run would still be about the initial weights (96% of
    them after 36 steps); from about 9,000 updates on it is the plain 0.999 average.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.source = [p for p in model.parameters() if p.requires_grad]
        self.target = [p for p, q in zip(self.model.parameters(), model.parameters()) if q.requires_grad]
        self.updates = torch.zeros((), device=self.source[0].device)  # on the device: no host sync

    def current_decay(self) -> torch.Tensor:
        return torch.clamp((1.0 + self.updates) / (10.0 + self.updates), max=self.decay)

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        """ema += (1 - decay_n) * weight * (param - ema); weight is 0 for a skipped step, else 1."""
        rate = weight * (1.0 - self.current_decay())
        self.updates += weight
        if _FOREACH_LERP_TAKES_A_TENSOR:
            torch._foreach_lerp_(self.target, self.source, rate)  # one multi-tensor kernel
        else:  # older torch: the same update in three foreach kernels
            delta = torch._foreach_sub(self.source, self.target)
            torch._foreach_mul_(delta, rate)
            torch._foreach_add_(self.target, delta)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


# --- the step ----------------------------------------------------------------------------------------------
def _dense(p: torch.Tensor) -> bool:
    return p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))


def attach_flat_grads(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Make every parameter's .grad a view, in its own memory layout, of one flat zeroed buffer.

    Backward then accumulates into those views in place (zero_grad keeps them: set_to_none=False),
    so the skip guard can zero all gradients with one fill on the buffer instead of a cat of
    reshaped copies and a copy back, which for channels_last weights cost about two kernels per
    tensor. Returns the buffer, or None (the per-tensor path) if dtypes or devices differ or a
    weight is neither contiguous nor channels_last.
    """
    if not params or any(p.dtype != params[0].dtype or p.device != params[0].device or not _dense(p)
                         or p.grad is not None for p in params):
        return None
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        p.grad = flat.as_strided(p.shape, p.stride(), offset)
        offset += p.numel()
    return flat


@dataclass
class StepState:
    """Device-side counters, read only when logging."""

    sums: torch.Tensor  # [loss_bpd, -elbo nats, recon, kl, finite steps] over the logging interval
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # total skipped steps
    consecutive: torch.Tensor  # skipped steps in a row

    @classmethod
    def zeros(cls, device) -> "StepState":
        z = lambda *s: torch.zeros(*s, device=device)
        return cls(z(5), z(()), z(()), z(()))


class Trainer:
    def __init__(self, model: DVPVAE, cfg: TrainConfig, steps_per_epoch: int, precision: str = "fp32",
                 ddp_model: torch.nn.Module | None = None):
        self.model, self.cfg, self.steps_per_epoch = model, cfg, steps_per_epoch
        self.net = ddp_model if ddp_model is not None else model  # what the forward goes through
        self.device = model.device
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
        self.ema = EMA(model, cfg.ema_decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._flat_grad = attach_flat_grads(self.params)
        self.state = StepState.zeros(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self._backup: list[torch.Tensor] | None = None

    def step(self, x: torch.Tensor) -> None:
        """One optimisation step on batch x, without a host sync."""
        self.optimizer.zero_grad(set_to_none=False)
        with self.autocast:
            out = self.net(x)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        ok = torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)
        self._sanitize_grads(ok)
        backup = self._snapshot()
        self.optimizer.step()
        self.scheduler.step()
        self._restore_if_skipped(backup, ok.float())
        self.model.project_parameters_()
        self.ema.update(ok.float())
        self._accumulate(out, grad_norm, ok.float())

    def _sanitize_grads(self, ok: torch.Tensor) -> None:
        """Zero every gradient of a non-finite step (NaN * 0 is NaN, hence a fill, not a product)."""
        if self._flat_grad is not None:  # every gradient is a view of it: one kernel, no copies
            self._flat_grad.masked_fill_(ok.logical_not(), 0.0)
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.where(ok, torch.cat([g.reshape(-1) for g in grads]), 0.0)
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def _stateful_tensors(self) -> list[torch.Tensor]:
        """Weights and Adamax moments: what a skipped step must leave untouched."""
        out = list(self.params)
        for p in self.params:
            st = self.optimizer.state.get(p, {})
            out += [st[k] for k in ("exp_avg", "exp_inf") if k in st]
        return out

    @torch.no_grad()  # a copy from the weights with grad on makes the backup a graph node, which grew every step
    def _snapshot(self) -> list[torch.Tensor]:
        tensors = self._stateful_tensors()
        if self._backup is None:
            self._backup = [t.detach().clone() for t in tensors]
        else:
            torch._foreach_copy_(self._backup, tensors)
        return self._backup

    def _restore_if_skipped(self, backup: list[torch.Tensor], ok: torch.Tensor) -> None:
        tensors = self._stateful_tensors()
        with torch.no_grad():
            delta = torch._foreach_sub(tensors, backup)
            torch._foreach_mul_(delta, ok)
            torch._foreach_add_(backup, delta)  # ok ? new : old
            torch._foreach_copy_(tensors, backup)

    def _accumulate(self, out, grad_norm: torch.Tensor, ok: torch.Tensor) -> None:
        st = self.state
        metrics = torch.stack([out.loss.detach().float(), -out.elbo.detach().float().mean(),
                               out.recon.detach().float().mean(), out.kl.detach().float().sum(1).mean()])
        st.sums[:4] += torch.where(ok.bool(), metrics, 0.0)
        st.sums[4] += ok
        st.grad_norm = grad_norm.detach()
        st.skipped += 1.0 - ok
        st.consecutive = (st.consecutive + 1.0) * (1.0 - ok)

    def read_metrics(self) -> dict:
        """Host-side view of the interval's metrics (one sync), and reset of the interval sums."""
        st = self.state
        values = torch.cat([st.sums, st.grad_norm.view(1), st.skipped.view(1), st.consecutive.view(1)]).tolist()
        st.sums.zero_()
        count = values[4]  # finite steps in the interval; with none, the means are NaN, not 0
        mean = (lambda v: v / count) if count else (lambda v: math.nan)
        return dict(loss=mean(values[0]), elbo=-mean(values[1]), recon=mean(values[2]), kl=mean(values[3]),
                    steps=count, grad_norm=values[5], skipped=int(values[6]), consecutive=int(values[7]))

    def state_dict(self) -> dict:
        return dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    ema=self.ema.model.state_dict(), ema_updates=self.ema.updates.item(),
                    skipped=self.state.skipped.item())

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.ema.model.load_state_dict(sd["ema"])
        # A checkpoint from before the warm-up existed continues with the full decay.
        self.ema.updates.fill_(sd.get("ema_updates", 1e9))
        self.state.skipped.fill_(sd.get("skipped", 0.0))


# --- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a CUDA device with bf16 support, else "fp32"; others unchanged. A CPU stays
    at fp32: bf16 autocast has not been measured faster on one (docs/training.md), and one without
    native bf16 instructions runs it several times slower (bf16_is_slow_here warns)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def bf16_is_slow_here(precision: str, device: torch.device) -> bool:
    """bf16 on a CPU that oneDNN cannot run bf16 convolutions on natively (no AVX512-BF16 or AMX):
    they fall back to aten's slow convolution, measured 8x slower than fp32 on such a CPU."""
    return precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def evaluate(model: DVPVAE, images: torch.Tensor, batch_size: int, precision: str = "fp32") -> dict:
    """Negative ELBO (nats and bits/dim) and active units of `model` on uint8 `images` (N, C, H, W), and
    per layer (`layers`: the mean KL in nats of u, z_L, ..., z_1 and the active units of z_L, ..., z_1);
    precision "bf16" runs the forward under bf16 autocast, as training does."""
    check_images(images, model.config, "images")
    was_training = model.training
    model.eval()
    batches = datasets.DeviceBatches(images, min(batch_size, images.shape[0]), model.device, shuffle=False,
                                     drop_last=False)
    total, kl, count = torch.zeros((), device=model.device), 0.0, 0
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for x in batches.batches(0):
        with autocast:
            out = model(x)
        total += (-out.elbo.float()).sum()
        kl = kl + out.kl.float().sum(0)
        count += x.shape[0]
    neg_elbo = total.item() / count
    masks = model.active_unit_masks(images[:5000].to(model.device).float() / 127.5 - 1.0, batch_size=batch_size)
    model.train(was_training)
    return dict(val_elbo=-neg_elbo, val_loss=neg_elbo / (model.config.pixels * math.log(2.0)),
                active_units=torch.cat(masks).double().mean().item(),
                layers=dict(kl=(kl / count).tolist(), active_units=[m.double().mean().item() for m in masks]))


def save_images(model: DVPVAE, val_images: torch.Tensor, folder: str, step: int) -> dict[str, torch.Tensor]:
    """A grid of 64 samples and one of 32 validation images next to their reconstructions; returns both
    image batches in [-1, 1] (samples, reconstructions)."""
    os.makedirs(folder, exist_ok=True)
    samples = model.sample(64)
    save_grid(samples, os.path.join(folder, f"step{step:07d}_samples.png"), nrow=8)
    x = val_images[:32].to(model.device).float() / 127.5 - 1.0
    pairs = torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)
    save_grid(pairs, os.path.join(folder, f"step{step:07d}_reconstructions.png"), nrow=16)
    return dict(samples=samples, reconstructions=pairs)


# --- the Python API: train on a uint8 tensor ------------------------------------------------------------------
def fit(model: DVPVAE, images: torch.Tensor, *, val_images: torch.Tensor | None = None, epochs: float | None = None,
        max_steps: int | None = None, batch_size: int | None = None, lr: float | None = None, seed: int = 0,
        precision: str = "auto", use_ema: bool = True, progress: bool = True) -> dict:
    """Train `model` in place on uint8 `images` (N, C, H, W), as dvp-train does but without a run folder.

    The optimiser, schedule, clipping and EMA are the model's preset's (`batch_size`, `lr`
    override them); it trains for `max_steps`, else `epochs` (default: the preset's). The
    DCT normaliser S is fitted on the training images first if it is not yet. `val_images`
    default to a `seed`-drawn 10% of `images` (the rest is trained on). At the end the model
    holds the EMA weights (`use_ema=False` keeps the raw ones) and is in eval mode. Returns
    dict(steps, train_loss (bits/dim, mean of the last epoch), val_loss, val_elbo, active_units,
    history: one row per epoch).
    """
    cfg = model.config
    check_images(images, cfg, "images")
    if val_images is None:
        train_images, val_images = (datasets.user_split(images, seed, split) for split in ("train", "val"))
    else:
        train_images, val_images = images, check_images(val_images, cfg, "val_images")
    overrides = {k: v for k, v in dict(batch_size=batch_size, lr=lr, seed=seed).items() if v is not None}
    tcfg = train_preset(cfg.name, **overrides) if cfg.name in PRESETS else TrainConfig(**overrides)
    seed_everything(seed)
    if model.pseudo is not None and cfg.pseudoinput_type == "dct" and not bool(model.pseudo.scale_fitted):
        model.fit_pseudoinput_scale(train_images)
    batches = datasets.DeviceBatches(train_images, tcfg.batch_size, model.device, seed=seed)
    total = max_steps or max(1, int(round((epochs or tcfg.epochs) * len(batches))))
    precision = resolve_precision(precision, model.device)
    trainer = Trainer(model, tcfg, len(batches), precision)
    validate, model.validate_inputs = model.validate_inputs, False  # uint8 converted on the device is in range
    history, step, epoch = [], 0, 0
    from tqdm import tqdm

    model.train()
    try:
        with tqdm(total=total, desc="dvp_fast.fit", unit="step", disable=not progress, file=sys.stderr) as bar:
            while step < total:
                for x in batches.batches(epoch):
                    trainer.step(x)
                    step += 1
                    bar.update(1)
                    if step >= total:
                        break
                m = trainer.read_metrics()
                history.append(dict(step=step, epoch=step / len(batches), loss=m["loss"], skipped=m["skipped"]))
                bar.set_postfix(loss=f"{m['loss']:.4f}bpd", refresh=False)
                epoch += 1
        trainer.ema.sync_buffers(model)
        final = trainer.ema.model if use_ema else model
        result = evaluate(final, val_images, tcfg.eval_batch_size, precision)
    finally:
        model.validate_inputs = validate
    if use_ema:
        model.load_state_dict(trainer.ema.model.state_dict())
    history[-1].update(result)
    model.eval()
    return dict(steps=step, train_loss=history[-1]["loss"], history=history, **result)


# --- RNG state ------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so that checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(torch=torch.get_rng_state(),
                 numpy=dict(kind=str(kind), keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                 python=[version, list(internal), gauss_next])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- metrics file -------------------------------------------------------------------------------------------
class MetricsCSV:
    """metrics.csv with a fixed header; on resume, rows past the checkpoint's step are dropped.

    Rows that a killed process left half-written (missing or extra fields) are dropped too;
    a file that cannot be parsed at all is kept beside the new one as metrics.csv.damaged.
    """

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        kept = []
        if resume_step is not None and os.path.exists(path):
            try:
                with open(path, newline="") as f:
                    kept = [r for r in csv.DictReader(f) if _complete_row(r, resume_step)]
            except (csv.Error, UnicodeDecodeError, ValueError) as exc:
                os.replace(path, path + ".damaged")
                print(f"dvp-train: warning: {path} could not be parsed ({exc}); moved it to {path}.damaged and "
                      f"started a new one", file=sys.stderr)
        self._rewrite(kept)

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, METRIC_FIELDS).writerow({k: _fmt(row.get(k)) for k in METRIC_FIELDS})
        except OSError as exc:
            raise OSError(exc.errno, f"cannot append to {self.path}: {exc.strerror or exc}") from exc


def _complete_row(row: dict, max_step: int) -> bool:
    """A row with exactly the known fields and a step no later than `max_step`."""
    if None in row or any(v is None for v in row.values()):
        return False  # a half-written line: fields missing, or two lines run together
    step = row.get("step") or ""
    return step.isdigit() and int(step) <= max_step


def _fmt(v):
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


# --- the run ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    p = OneLineParser(prog="dvp-train", description="Train a DVP-VAE.")
    p.add_argument("--preset", default="mnist", choices=PRESETS, help="model and optimisation preset")
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>-<data>); re-run to resume")
    p.add_argument("--data", default="embedded", type=data_argument, metavar="DATA",
                   help=f"{', '.join(datasets.DATASETS)}, or your own images: folder:PATH (PNG/JPEG files), "
                        f"npz:PATH or npy:PATH (uint8 arrays); default: the 5,000 MNIST digits embedded in the "
                        f"install")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--download", action="store_true", help="fetch missing standard dataset files into --data-dir")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="stop after this many optimisation steps")
    length.add_argument("--epochs", type=float, default=None, help="stop after this many epochs (preset default)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (preset default)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (preset default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on a GPU that supports it, fp32 on a CPU (bf16 is several times "
                        "slower on a CPU without native bf16 instructions)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network, block by block")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile on a GPU: replay each compiled block as a CUDA graph "
                        "(torch.compile mode='reduce-overhead'); pays where kernel launches dominate")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: eval)")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between evaluations (default: one epoch, but at least {MIN_EVAL_INTERVAL} steps)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metric reads (each is one sync)")
    p.add_argument("--seed", type=int, default=None, help="random seed (preset default)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 helps on a busy machine)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics and sample grids as TensorBoard event files in the run folder "
                        "(needs the tensorboard package)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.tensorboard and not tensorboard_available():
        p.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    for name in ("max_steps", "batch_size", "checkpoint_every", "eval_every", "log_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.cuda_graphs and not args.compile:
        p.error("--cuda-graphs needs --compile")
    if args.epochs is not None and args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


def _device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, initialising the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _compile_blocks(model: DVPVAE, cuda_graphs: bool = False) -> None:
    """Compile the repeated blocks one by one: short compile times, one graph per block class.

    cuda_graphs=True uses mode="reduce-overhead": inductor records each block's kernels
    (forward and backward) as CUDA graphs and replays them, removing launch overhead.
    dynamic=False: another input shape (an epoch's last, smaller batch; evaluation) gets a
    graph of its own with static shapes, never a recompile with dynamic ones.
    """
    mode = "reduce-overhead" if cuda_graphs else None
    # Only modules the model enters through __call__: Module.compile replaces that, so a module
    # reached through its methods (as the blocks once were, block.prior(...)) would stay eager.
    resnets = [block.resnet for block in model.blocks if not block.last]  # the bulk of block.update
    for module in [*model.encoder.scales, *model.blocks, *resnets]:
        module.compile(mode=mode, dynamic=False)
    if model.u_prior is not None and hasattr(model.u_prior, "unet"):
        model.u_prior.unet.compile(mode=mode, dynamic=False)


def _check_writable(folder: str) -> None:
    """Create the run folder and write a probe file there, before any training."""
    probe = os.path.join(folder, f".write_test{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write to the run folder {folder}: {exc.strerror or exc}") from exc


def checkpoint_bytes(model: DVPVAE) -> int:
    """Rough size of a training checkpoint: weights, EMA weights and two Adamax moments."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return 4 * params + 2 * buffers + (1 << 20)


def _check_free_space(folder: str, model: DVPVAE) -> None:
    """Refuse to start when the disk cannot hold last.pt, best.pt and the temporary copy of one."""
    need = 3 * checkpoint_bytes(model)
    existing = [os.path.join(folder, name) for name in (LAST, BEST)]
    need -= sum(os.path.getsize(path) for path in existing if os.path.isfile(path))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"only {free / 2**20:.1f} MiB free on the disk of {folder}, but training "
                                    f"needs about {need / 2**20:.1f} MiB for its checkpoints (last.pt, best.pt and "
                                    f"a temporary copy while one is replaced); free some space or choose "
                                    f"another --out")


def _lock_run_folder(folder: str):
    """An exclusive lock on folder/.lock for the life of the run (released by the OS even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: run unlocked
        return contextlib.nullcontext()
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RuntimeError(f"another dvp-train (pid {holder}) is training in {folder}; wait for it to finish "
                           f"or choose another --out") from None
    except OSError:  # a file system without locks (some NFS): run unlocked
        return f
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class _NewRunFolder:
    """The run folder as this run found it: a run that created it and fails before its first
    checkpoint removes it again with what it put there (.lock, config.json, an empty
    metrics.csv, an empty samples/), so a failed start leaves nothing behind. Anything else in
    it (a checkpoint, a metrics row, a sample, a file of someone else's) keeps it all."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.ours = (".lock", "config.json", "config.json.tmp", "metrics.csv", "metrics.csv.tmp", "samples",
                     f".write_test{os.getpid()}")
        self.checkpointed = False
        self.created = []  # the folders os.makedirs will create, deepest first; empty: it existed
        path = self.folder
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            self.created.append(path)
            path = os.path.dirname(path)

    def _unused(self) -> bool:
        try:
            entries = os.listdir(self.folder)
            if not set(entries) <= set(self.ours):
                return False
            if "samples" in entries and os.listdir(os.path.join(self.folder, "samples")):
                return False
            if "metrics.csv" in entries:
                with open(os.path.join(self.folder, "metrics.csv"), newline="") as f:
                    if sum(1 for _ in csv.reader(f)) > 1:
                        return False  # a row beyond the header
        except OSError:
            return False
        return True

    def remove(self) -> None:
        """Undo the folder's creation if the run got no checkpoint and left nothing of value there."""
        if not self.created or self.checkpointed or not os.path.isdir(self.folder) or not self._unused():
            return
        try:
            for name in self.ours:
                path = os.path.join(self.folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                elif os.path.lexists(path):
                    os.remove(path)
            for folder in self.created:  # rmdir never removes a folder that is not empty
                os.rmdir(folder)
        except OSError:
            pass

    def exit(self, exc_type, exc, tb) -> bool:
        """ExitStack.push callback: remove() when the run fails, never swallow the error."""
        if exc_type is not None:
            self.remove()
        return False


def _load_resume(path: str) -> dict:
    """The training checkpoint at `path`, or an error that says how to go on without it."""
    try:
        payload = load_checkpoint(path)
        require_keys(payload, path, RESUME_KEYS, "training checkpoint that can be resumed")
        saved = DVPConfig.from_dict(payload["model_config"])
        tcfg = TrainConfig.from_dict(payload["train_config"])
    except (CheckpointError, ValueError, TypeError) as exc:
        best = os.path.join(os.path.dirname(path), BEST)
        hint = f" ({best} holds the best weights so far)" if os.path.isfile(best) else ""
        raise CheckpointError(f"cannot resume: {exc}; move {path} away to start this run afresh{hint}") from exc
    payload["model_config"], payload["train_config"] = saved, tcfg
    return payload


class Stopped(Exception):
    """The run stopped cleanly on SIGTERM or SIGINT, after saving last.pt."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _StopRequests:
    """SIGTERM/SIGINT set a flag that the loop reads between steps (a second one stops at once)."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT") if hasattr(signal, n))

    def __init__(self, stack: contextlib.ExitStack):
        self.signum: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            stack.callback(signal.signal, signum, previous)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def _write_json(path: str, content: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)


def data_argument(text: str) -> str:
    """argparse type of --data: a dataset name or a user source."""
    try:
        return datasets.check_data_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_images(images, cfg: DVPConfig, source: str) -> torch.Tensor:
    """`images` if they are uint8 (N, C, H, W) of the shape `cfg` models, else one ValueError saying so."""
    expected = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{source}: expected a uint8 torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{source}: expected uint8 images in [0, 255], got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        kind = {1: "grayscale", 3: "RGB"}.get(cfg.image_channels, f"{cfg.image_channels}-channel")
        raise ValueError(f"{source}: a tensor of shape {tuple(images.shape)}, but preset {cfg.name!r} expects "
                         f"{kind} images of shape {expected}, at least one (images are not resized)")
    return images


def _load_data(args, cfg: DVPConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if datasets.is_user_source(args.data):  # read the files once, then split with the run's seed
        images = check_images(datasets.load_user_images(args.data), cfg, args.data)
        return datasets.user_split(images, seed, "train"), datasets.user_split(images, seed, "val")
    train = datasets.load_images(args.data, "train", root=args.data_dir, download=args.download)
    val = datasets.load_images(args.data, "val", root=args.data_dir)
    return check_images(train, cfg, f"dataset {args.data!r}"), val


def _summary_line(step: int, steps_per_epoch: int, seconds: float, train: tuple[float, int], last_eval: dict,
                  best: float, best_step: int | None, skipped: int) -> str:
    """The end-of-run line: steps and time, then training and validation loss, both in bits/dim."""
    best_text = f"best {best:.4f} at step {best_step}" if best_step is not None else f"best {best:.4f}"
    skipped_text = f" ({skipped} skipped as non-finite)" if skipped else ""
    return (f"done: {step} steps ({step / steps_per_epoch:.1f} epochs) in {seconds:.0f} s{skipped_text}; loss in "
            f"bits/dim: training {train[0]:.4f} (mean of the last {train[1]} steps), validation "
            f"{last_eval['val_loss']:.4f} ({best_text}); {last_eval['active_units']:.0%} active units")


def _data_label(data: str) -> str:
    """A dataset name, or a user source's file or folder name, for the default run folder."""
    if not datasets.is_user_source(data):
        return data
    path = data.split(":", 1)[1].rstrip("/\\")
    return os.path.splitext(os.path.basename(path))[0] or "data"


def run(args) -> dict:
    with contextlib.ExitStack() as stack:
        return _run(args, stack)


def _run(args, stack: contextlib.ExitStack) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world, local_rank = _distributed()
    is_main = rank == 0
    device = _device(args.device, local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: time the conv algorithms once
    precision = resolve_precision(args.precision, device)
    if is_main and bf16_is_slow_here(precision, device):
        print("dvp-train: warning: --precision bf16 on a CPU without native bf16 instructions: its convolutions "
              "run on a slow fallback, several times slower than fp32 (the default here)", file=sys.stderr)
    overrides = {k: v for k, v in dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed).items() if v is not None}
    tcfg = train_preset(args.preset, **overrides)
    mcfg = model_preset(args.preset)
    out = args.out or os.path.join("runs", f"{args.preset}-{_data_label(args.data)}")
    new_folder = _NewRunFolder(out)
    if is_main:
        try:
            _check_writable(out)
        except OSError:
            new_folder.remove()
            raise
        stack.enter_context(_lock_run_folder(out))
        stack.push(new_folder.exit)  # runs before the lock is released
        for name in remove_stale_temporaries(out):
            print(f"dvp-train: removed {name}, left by an interrupted checkpoint write", file=sys.stderr)
    if tcfg.batch_size % world:
        raise ValueError(f"--batch-size {tcfg.batch_size} must be divisible by the {world} processes")

    last_path = os.path.join(out, LAST)
    resume = _load_resume(last_path) if os.path.exists(last_path) else None
    if resume is not None:
        saved = resume["model_config"]
        if saved != mcfg:
            raise ValueError(f"{last_path} holds a run of preset {saved.name!r} with another configuration; "
                             f"choose a new --out to start a {mcfg.name!r} run")
        tcfg = resume["train_config"]
        if resume["run"].get("data") != args.data:
            raise ValueError(f"{last_path} was trained on --data {resume['run'].get('data')}, not {args.data}")

    seed_everything(tcfg.seed + rank)
    train_images, val_images = _load_data(args, mcfg, tcfg.seed)
    model = DVPVAE(mcfg).to(device)
    model.validate_inputs = False  # uint8 data converted on device is in range by construction
    if is_main:
        _check_free_space(out, model)
    if device.type == "cpu":  # "auto" picks the C++ kernels on CPU: build (once) and load them now, on lines
        backend_available("cpp")  # of their own ("building", how long it took), not inside step 1's progress bar
    if resume is None and model.pseudo is not None and mcfg.pseudoinput_type == "dct":
        fit_start = time.perf_counter()
        fit_scale_cached(model, train_images, args.data, "train")
        if is_main and time.perf_counter() - fit_start > 2.0:
            print(f"dvp-train: fitted the DCT normaliser S on {train_images.shape[0]} images in "
                  f"{time.perf_counter() - fit_start:.0f} s (cached for the next run)", flush=True)
    batches = datasets.DeviceBatches(train_images, tcfg.batch_size, device, seed=tcfg.seed)
    steps_per_epoch = len(batches)
    total_steps = args.max_steps or max(1, int(round((args.epochs or tcfg.epochs) * steps_per_epoch)))
    eval_every = args.eval_every or max(steps_per_epoch, MIN_EVAL_INTERVAL)
    ckpt_every = args.checkpoint_every or eval_every

    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                        else None)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")
    if args.compile:
        _compile_blocks(model, cuda_graphs=args.cuda_graphs)
        if is_main:
            print("dvp-train: --compile: the first steps (and the first evaluation) compile every block; the "
                  "progress bar waits until they are done", flush=True)
    trainer = Trainer(model, tcfg, steps_per_epoch, precision, ddp)
    trainer.ema.model.validate_inputs = False
    if args.compile:
        # The EMA model is a deep copy, and a copy drops what Module.compile set: compile the blocks that
        # evaluation and the sample grids run on it too (without CUDA graphs: they run rarely, at other
        # batch sizes, and each graph would hold a memory pool).
        _compile_blocks(trainer.ema.model)

    step, epoch, batch_index, best, best_step = 0, 0, 0, math.inf, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        trainer.load_state_dict(resume["trainer"])
        step, epoch, batch_index = resume["step"], resume["epoch"], resume["batch_index"]
        best, best_step = resume.get("best_val_loss", math.inf), resume.get("best_step")
        if rank == 0:
            set_rng_state(resume["rng"])
        else:
            seed_everything(tcfg.seed + rank + 7919 * step)
        if is_main:
            print(f"dvp-train: resuming {last_path} at step {step} (epoch {epoch}, batch {batch_index})", flush=True)

    if is_main:
        _write_json(os.path.join(out, "config.json"),
                    dict(model=mcfg.to_dict(), train=tcfg.to_dict(), run=dict(vars(args), out=out, world_size=world)))
        metrics = MetricsCSV(os.path.join(out, "metrics.csv"), step if resume is not None else None)
        layer_log = LayerLog(out, step if resume is not None else None)
        board = TensorBoard(out) if args.tensorboard else None
        if board is not None:
            stack.callback(board.close)

    def checkpoint(path: str, position: tuple[int, int]) -> None:
        payload = dict(model_config=mcfg.to_dict(), train_config=tcfg.to_dict(), run=dict(data=args.data),
                       model=model.state_dict(), trainer=trainer.state_dict(), step=step, epoch=position[0],
                       batch_index=position[1], best_val_loss=best, best_step=best_step, rng=rng_state(),
                       ema=trainer.ema.model.state_dict())
        try:
            save_checkpoint(payload, path)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc}; training stopped at step {step}; re-run the same "
                                     f"command to resume from the last checkpoint") from exc
        new_folder.checkpointed = True

    progress = None
    if is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=f"dvp-train {args.preset}", unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        stack.callback(progress.close)
    say = progress.write if progress is not None else (lambda text: print(text, file=sys.stderr, flush=True))
    skipped_seen = int(resume["trainer"].get("skipped", 0)) if resume is not None else 0
    stop = _StopRequests(stack)
    started, t_interval, step_interval = time.time(), time.perf_counter(), step
    model.train()
    summary = {}
    last_train = (math.nan, 0)  # (mean training loss in bits/dim, steps it is the mean of)
    if step >= total_steps and is_main:
        print(f"dvp-train: {out} has already trained {step} steps, as many as asked for ({total_steps}); nothing to "
              f"do (a larger --epochs or --max-steps trains on from there)", flush=True)
    while step < total_steps:
        for x in batches.batches(epoch, start=batch_index):
            if world > 1:
                x = x[rank::world]
            trainer.step(x)
            step += 1
            batch_index += 1
            position = (epoch, batch_index) if batch_index < steps_per_epoch else (epoch + 1, 0)
            done = step >= total_steps
            row = None
            if step % args.log_every == 0 or done:
                m = trainer.read_metrics()
                last_train = (m["loss"], step - step_interval)
                elapsed = time.perf_counter() - t_interval
                ips = (step - step_interval) * tcfg.batch_size / max(elapsed, 1e-9)
                t_interval, step_interval = time.perf_counter(), step
                if m["skipped"] > skipped_seen and is_main:
                    say(f"dvp-train: step {step}: skipped {m['skipped'] - skipped_seen} step(s) with a non-finite "
                        f"loss or gradient ({m['skipped']} in total)")
                    skipped_seen = m["skipped"]
                if m["consecutive"] >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(f"training diverged: the last {m['consecutive']} steps (up to step {step}) had "
                                       f"a non-finite loss or gradient and were skipped; lower --lr (it is "
                                       f"{tcfg.lr:g}) or check the data; re-running resumes from the last checkpoint")
                row = dict(step=step, epoch=step / steps_per_epoch, lr=trainer.scheduler.get_last_lr()[0],
                           loss=m["loss"], elbo=m["elbo"], recon=m["recon"], kl=m["kl"], grad_norm=m["grad_norm"],
                           skipped=m["skipped"], images_per_s=ips, time_s=time.time() - started)
                if progress is not None:
                    progress.set_postfix(loss=f"{m['loss']:.4f}bpd", nats=f"{-m['elbo']:.2f}",
                                         img_s=f"{ips:.0f}", skipped=m["skipped"], refresh=False)
            if (step % eval_every == 0 or done) and is_main:
                trainer.ema.sync_buffers(model)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    ev = evaluate(trainer.ema.model, val_images, tcfg.eval_batch_size, precision)
                    grids = save_images(trainer.ema.model, val_images, os.path.join(out, "samples"), step)
                layers = ev.pop("layers")
                layer_log.add(step, layers["kl"], layers["active_units"])
                if board is not None:
                    board.evaluation(step, ev, layers, grids)
                row = {**(row or dict(step=step, epoch=step / steps_per_epoch)), **ev}
                summary = ev
                if ev["val_loss"] < best:
                    best, best_step = ev["val_loss"], step
                    checkpoint(os.path.join(out, BEST), position)
            if is_main and row is not None:
                metrics.append(row)
                if "val_loss" in row:  # an evaluation: the figure, from the files just written
                    plot_learning_curve(out)
                if board is not None:
                    board.scalars(row)
            if (step % ckpt_every == 0 or done) and is_main:
                checkpoint(last_path, position)
            if stop.signum is not None and not done:
                if is_main and step % ckpt_every:
                    checkpoint(last_path, position)
                name = signal.Signals(stop.signum).name
                raise Stopped(stop.signum, f"stopped by {name} after step {step}; saved {last_path}; re-run the "
                                           f"same command to resume")
            if progress is not None:
                progress.update(1)
            if done:
                break
        epoch, batch_index = (epoch + 1, 0) if batch_index >= steps_per_epoch else (epoch, batch_index)
    if progress is not None:
        progress.close()
    skipped = int(trainer.state.skipped.item())
    result = dict(steps=step, best_val_loss=best, out=out, skipped=skipped, train_loss=last_train[0], **summary)
    if is_main and "val_loss" in summary:
        line = _summary_line(step, steps_per_epoch, time.time() - started, last_train, summary, best, best_step,
                             skipped)
        print(f"dvp-train: {line}; checkpoints in {out} ({BEST}, {LAST})", flush=True)
    if world > 1:
        dist.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except Stopped as exc:
        print(f"dvp-train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("dvp-train: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        return report_error("dvp-train", exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
