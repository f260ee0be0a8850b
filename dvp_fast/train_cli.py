"""dvp-train: train a DVP-VAE from the command line, resume exactly, log, checkpoint and draw samples.

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

import contextlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from . import checks
from . import data as datasets
from .checkpoint import BEST, LAST, remove_stale_temporaries
from .cli import OneLineParser, data_argument, report_error
from .config import PRESETS, DVPConfig, model_preset, train_preset
from .model import DVPVAE
from .ops import backend_available
from .pseudoinput_cache import fit_scale_cached
from .run_folder import (NewRunFolder, RunFolder, StopRequests, Stopped, check_free_space, check_writable,
                         load_resume, lock_run_folder, write_json)
from .tensorboard_log import tensorboard_available
from .rng import seed_everything
from .train import Outputs, Position, Schedule, train_loop
from .trainer import Trainer, bf16_is_slow_here, compile_blocks, resolve_precision

# Default evaluations come once an epoch, but not more often than this: on the 4,000 embedded
# digits an epoch is 16 steps, and evaluating after each would take a third of a short run.
MIN_EVAL_INTERVAL = 50


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


def _load_data(args, cfg: DVPConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if datasets.is_user_source(args.data):  # read the files once, then split with the run's seed
        images = checks.uint8_images(datasets.load_user_images(args.data), cfg, args.data)
        return datasets.user_split(images, seed, "train"), datasets.user_split(images, seed, "val")
    train = datasets.load_images(args.data, "train", root=args.data_dir, download=args.download)
    val = datasets.load_images(args.data, "val", root=args.data_dir)
    return checks.uint8_images(train, cfg, f"dataset {args.data!r}"), val


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




def _prepare_device(args, rank: int, local_rank: int) -> tuple[torch.device, str]:
    """The device and the precision the flags ask for, with the GPU's fast paths switched on."""
    device = _device(args.device, local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: time the conv algorithms once
    precision = resolve_precision(args.precision, device)
    if rank == 0 and bf16_is_slow_here(precision, device):
        print("dvp-train: warning: --precision bf16 on a CPU without native bf16 instructions: its convolutions "
              "run on a slow fallback, several times slower than fp32 (the default here)", file=sys.stderr)
    return device, precision


def _open_run_folder(out: str, stack: contextlib.ExitStack) -> NewRunFolder:
    """Check, lock and tidy the run folder (rank 0 only); a failed start removes what it created."""
    new_folder = NewRunFolder(out)
    try:
        check_writable(out)
    except OSError:
        new_folder.remove()
        raise
    stack.enter_context(lock_run_folder(out))
    stack.push(new_folder.exit)  # runs before the lock is released
    for name in remove_stale_temporaries(out):
        print(f"dvp-train: removed {name}, left by an interrupted checkpoint write", file=sys.stderr)
    return new_folder


def _resume_point(last_path: str, mcfg: DVPConfig, data: str) -> dict | None:
    """last.pt's payload if the run folder holds one of this configuration and data, else None."""
    if not os.path.exists(last_path):
        return None
    resume = load_resume(last_path)
    saved = resume["model_config"]
    if saved != mcfg:
        raise ValueError(f"{last_path} holds a run of preset {saved.name!r} with another configuration; "
                         f"choose a new --out to start a {mcfg.name!r} run")
    if resume["run"].get("data") != data:
        raise ValueError(f"{last_path} was trained on --data {resume['run'].get('data')}, not {data}")
    return resume


def run(args) -> dict:
    with contextlib.ExitStack() as stack:
        return _run(args, stack)


def _run(args, stack: contextlib.ExitStack) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world, local_rank = _distributed()
    is_main = rank == 0
    device, precision = _prepare_device(args, rank, local_rank)
    overrides = {k: v for k, v in dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed).items() if v is not None}
    tcfg = train_preset(args.preset, **overrides)
    mcfg = model_preset(args.preset)
    out = args.out or os.path.join("runs", f"{args.preset}-{_data_label(args.data)}")
    new_folder = _open_run_folder(out, stack) if is_main else NewRunFolder(out)
    if tcfg.batch_size % world:
        raise ValueError(f"--batch-size {tcfg.batch_size} must be divisible by the {world} processes")
    last_path = os.path.join(out, LAST)
    resume = _resume_point(last_path, mcfg, args.data)
    if resume is not None:
        tcfg = resume["train_config"]

    # The model, its data and its DCT normaliser S.
    seed_everything(tcfg.seed + rank)  # the initial weights
    train_images, val_images = _load_data(args, mcfg, tcfg.seed)
    model = DVPVAE(mcfg).to(device)
    model.validate_inputs = False  # uint8 data converted on device is in range by construction
    if is_main:
        check_free_space(out, model)
    if device.type == "cpu":  # "auto" picks the C++ kernels on CPU: build (once) and load them now, on lines
        backend_available("cpp")  # of their own ("building", how long it took), not inside step 1's progress bar
    if resume is None and model.pseudo is not None and mcfg.pseudoinput_type == "dct":
        fit_start = time.perf_counter()
        fit_scale_cached(model, train_images, args.data, "train")
        if is_main and time.perf_counter() - fit_start > 2.0:
            print(f"dvp-train: fitted the DCT normaliser S on {train_images.shape[0]} images in "
                  f"{time.perf_counter() - fit_start:.0f} s (cached for the next run)", flush=True)

    # The schedule.
    batches = datasets.DeviceBatches(train_images, tcfg.batch_size, device, seed=tcfg.seed)
    steps_per_epoch = len(batches)
    total_steps = args.max_steps or max(1, int(round((args.epochs or tcfg.epochs) * steps_per_epoch)))
    eval_every = args.eval_every or max(steps_per_epoch, MIN_EVAL_INTERVAL)
    schedule = Schedule(total_steps, args.log_every, eval_every, args.checkpoint_every or eval_every)

    # The network as it will run: channels-last on a GPU, DDP, compiled; the trainer around it.
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                        else None)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")
    if args.compile:
        compile_blocks(model, cuda_graphs=args.cuda_graphs)
        if is_main:
            print("dvp-train: --compile: the first steps (and the first evaluation) compile every block; the "
                  "progress bar waits until they are done", flush=True)
    trainer = Trainer(model, tcfg, steps_per_epoch, precision, ddp)
    trainer.ema.model.validate_inputs = False
    if args.compile:
        # The EMA model is a deep copy, and a copy drops what Module.compile set: compile the blocks that
        # evaluation and the sample grids run on it too (without CUDA graphs: they run rarely, at other
        # batch sizes, and each graph would hold a memory pool).
        compile_blocks(trainer.ema.model)

    start = Position()
    if resume is not None:
        model.load_state_dict(resume["model"])
        trainer.load_state_dict(resume["trainer"])
        start = Position(resume["step"], resume["epoch"], resume["batch_index"],
                         resume.get("best_val_loss", math.inf), resume.get("best_step"), rng=resume["rng"])
        if is_main:
            print(f"dvp-train: resuming {last_path} at step {start.step} (epoch {start.epoch}, batch "
                  f"{start.batch_index})", flush=True)

    outputs = Outputs()
    if is_main:
        write_json(os.path.join(out, "config.json"),
                   dict(model=mcfg.to_dict(), train=tcfg.to_dict(), run=dict(vars(args), out=out, world_size=world)))
        outputs = RunFolder(out, trainer, mcfg, tcfg, args.data, new_folder,
                            start.step if resume is not None else None, args.tensorboard)
        stack.callback(outputs.close)
        if start.step >= total_steps:
            print(f"dvp-train: {out} has already trained {start.step} steps, as many as asked for ({total_steps}); "
                  f"nothing to do (a larger --epochs or --max-steps trains on from there)", flush=True)

    result = train_loop(trainer, batches, val_images, schedule, outputs, start=start, rank=rank, world=world,
                        stop=StopRequests(stack), progress=not args.no_progress, name="dvp-train",
                        desc=f"dvp-train {args.preset}")
    summary = {k: v for k, v in result.last_eval.items() if k != "layers"}
    if is_main and summary:
        line = _summary_line(result.steps, steps_per_epoch, result.seconds, (result.train_loss, result.train_steps),
                             summary, result.best_val_loss, result.best_step, result.skipped)
        print(f"dvp-train: {line}; checkpoints in {out} ({BEST}, {LAST})", flush=True)
    if world > 1:
        dist.barrier()
    return dict(steps=result.steps, best_val_loss=result.best_val_loss, out=out, skipped=result.skipped,
                train_loss=result.train_loss, **summary)
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
