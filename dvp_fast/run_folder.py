"""The run folder of dvp-train: its safety (a lock, free space, a failed start that leaves nothing, clean
stops on signals), what the loop writes there (metrics.csv, layers.csv and learning_curve.png, sample
grids, TensorBoard events, last.pt and best.pt) and the resume from last.pt.

    runs/<name>/  last.pt  best.pt  metrics.csv  layers.csv  learning_curve.png  config.json  samples/*.png
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import signal
import sys
import threading

import torch

from .atomic import atomic_write_bytes
from .checkpoint import BEST, LAST, CheckpointError, load_checkpoint, require_keys, save_checkpoint
from .config import DVPConfig, TrainConfig
from .images import save_grid
from .learning_curve import LayerLog, plot_learning_curve
from .model import DVPVAE
from .rng import rng_state
from .tensorboard_log import TensorBoard

METRIC_FIELDS = ["step", "epoch", "lr", "loss", "elbo", "recon", "kl", "grad_norm", "skipped", "images_per_s",
                 "val_loss", "val_elbo", "active_units", "time_s"]
RESUME_KEYS = ("model_config", "train_config", "run", "model", "trainer", "step", "epoch", "batch_index", "rng")


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
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode(), tmp=self.path + ".tmp")

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




# --- safety: writable, free space, one run at a time, nothing left by a failed start ----------------------------
def check_writable(folder: str) -> None:
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


def check_free_space(folder: str, model: DVPVAE) -> None:
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


def lock_run_folder(folder: str):
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


class NewRunFolder:
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




# --- resume and stop ------------------------------------------------------------------------------------------
def load_resume(path: str) -> dict:
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


class StopRequests:
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


def write_json(path: str, content: dict) -> None:
    atomic_write_bytes(path, json.dumps(content, indent=2).encode(), tmp=path + ".tmp")



# --- what the training loop writes --------------------------------------------------------------------------------
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


class RunFolder:
    """The training loop's outputs (dvp_fast.train.Outputs) in a dvp-train run folder: metrics.csv,
    layers.csv and learning_curve.png, samples/*.png, TensorBoard events, best.pt and last.pt.

    `resume_step`: the step of the last.pt resumed from (rows logged after it are dropped), or None.
    """

    def __init__(self, out: str, trainer, model_config: DVPConfig, train_config: TrainConfig, data: str,
                 new_folder: NewRunFolder, resume_step: int | None, tensorboard: bool):
        self.out, self.trainer, self.new_folder = out, trainer, new_folder
        self.model_config, self.train_config, self.data = model_config, train_config, data
        self.metrics = MetricsCSV(os.path.join(out, "metrics.csv"), resume_step)
        self.layers = LayerLog(out, resume_step)
        self.board = TensorBoard(out) if tensorboard else None

    def log(self, row: dict) -> None:
        self.metrics.append(row)
        if "val_loss" in row:  # an evaluation: the figure, from the files just written
            plot_learning_curve(self.out)
        if self.board is not None:
            self.board.scalars(row)

    def evaluated(self, step: int, model: DVPVAE, val_images: torch.Tensor, result: dict) -> None:
        grids = save_images(model, val_images, os.path.join(self.out, "samples"), step)
        layers = result["layers"]
        self.layers.add(step, layers["kl"], layers["active_units"])
        if self.board is not None:
            self.board.evaluation(step, {k: v for k, v in result.items() if k != "layers"}, layers, grids)

    def checkpoint(self, name: str, position) -> None:
        """Write `name` (last.pt or best.pt) atomically: weights, EMA, optimiser, schedule, RNG states and
        the position in the data, all a resume needs."""
        trainer = self.trainer
        payload = dict(model_config=self.model_config.to_dict(), train_config=self.train_config.to_dict(),
                       run=dict(data=self.data), model=trainer.model.state_dict(), trainer=trainer.state_dict(),
                       step=position.step, epoch=position.epoch, batch_index=position.batch_index,
                       best_val_loss=position.best, best_step=position.best_step, rng=rng_state(),
                       ema=trainer.ema.model.state_dict())
        try:
            save_checkpoint(payload, os.path.join(self.out, name))
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc}; training stopped at step {position.step}; re-run the "
                                     f"same command to resume from the last checkpoint") from exc
        self.new_folder.checkpointed = True

    def stopped(self, signum: int, step: int) -> Stopped:
        return Stopped(signum, f"stopped by {signal.Signals(signum).name} after step {step}; saved "
                               f"{os.path.join(self.out, LAST)}; re-run the same command to resume")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
