"""dvp-export: turn a dvp-train run into a folder to share (model.safetensors, config.json, README.md).

    dvp-export --checkpoint runs/mnist-embedded --out mnist-dvp      # best.pt's EMA weights
    huggingface-cli upload USER/mnist-dvp mnist-dvp                   # then: DVPVAE.from_pretrained("USER/mnist-dvp")

The README.md is a model card written from the run: the preset, the data, the steps, the
validation loss at the exported step and, for every `dvp-eval` of this very checkpoint file
(matched by its SHA-256), the test NLL and its number of importance samples.
"""
from __future__ import annotations

import csv
import math
import os

from .checkpoint import load_checkpoint, resolve_checkpoint
from .cli import OneLineParser, _run, file_sha256, read_evaluations
from .atomic import atomic_write_bytes
from .model import DVPVAE
from .pretrained import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from .data import is_user_source

OUR_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
DATA_TEXT = {
    "embedded": "5,000 MNIST digits shipped with dvp_fast (4,000 for training, 500 for validation)",
    "mnist": "MNIST (55,000 training images, 5,000 held out for validation)",
    "omniglot": "OMNIGLOT as in the IWAE paper (23,345 training images, 1,000 held out for validation)",
    "cifar10": "CIFAR-10 (45,000 training images, 5,000 held out for validation)",
}
HUB_DATASETS = {"embedded": "mnist", "mnist": "mnist", "omniglot": "omniglot", "cifar10": "cifar10"}


def _validation_at(folder: str, step: int) -> dict | None:
    """metrics.csv's validation entries at `step`, if that step was evaluated."""
    try:
        with open(os.path.join(folder, "metrics.csv"), newline="") as f:
            for row in csv.DictReader(f):
                if row.get("step") == str(step) and row.get("val_loss"):
                    return dict(val_loss_bits_per_dim=float(row["val_loss"]), val_elbo_nats=float(row["val_elbo"]))
    except (OSError, ValueError, KeyError, csv.Error):
        pass
    return None


def run_summary(path: str, payload: dict, ema: bool) -> dict:
    """What the model card says about the run, from the checkpoint and the files beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    train = payload.get("train_config", {})
    sha = file_sha256(path)
    summary = dict(preset=payload["model_config"].get("name"), data=payload.get("run", {}).get("data"),
                   steps=payload.get("step"), batch_size=train.get("batch_size"), weights="ema" if ema else "raw",
                   ema_decay=train.get("ema_decay"), source_checkpoint=os.path.basename(path),
                   source_sha256=sha)
    summary["validation"] = _validation_at(folder, payload.get("step"))
    if summary["validation"] is None and os.path.basename(path) == "best.pt" and math.isfinite(
            payload.get("best_val_loss", math.inf)):
        summary["validation"] = dict(val_loss_bits_per_dim=payload["best_val_loss"])
    summary["evaluations"] = [{k: r.get(k) for k in ("data", "split", "images", "num_samples", "nll", "nll_stderr",
                                                        "bits_per_dim", "neg_elbo", "active_units", "date")}
                              for r in read_evaluations(folder)
                              if r.get("checkpoint_sha256") == sha and r.get("ema", True) == ema]
    return summary


def _data_text(data: str | None) -> str:
    if data is None:
        return "not recorded"
    if is_user_source(data):
        return f"the user's own images ({data.split(':', 1)[0]} source {os.path.basename(data.rstrip('/'))!r})"
    return DATA_TEXT.get(data, data)


def model_card(summary: dict, where: str) -> str:
    """README.md in the Hugging Face model-card form (YAML front matter, then Markdown)."""
    front = ["---", "library_name: dvp_fast", "tags:", "- vae", "- hierarchical-vae", "- dvp-vae",
             "- diffusion", "- image-generation"]
    if summary["data"] in HUB_DATASETS:
        front += ["datasets:", f"- {HUB_DATASETS[summary['data']]}"]
    front.append("---")
    v = summary["validation"]
    val_text = "not evaluated at this step"
    if v:
        val_text = f"{v['val_loss_bits_per_dim']:.4f} bits/dim"
        if "val_elbo_nats" in v:
            val_text += f" (ELBO {v['val_elbo_nats']:.2f} nats per image)"
    weights = "raw training weights (not their moving average)"
    if summary["weights"] == "ema":
        weights = f"exponential moving average of the weights (decay {summary['ema_decay']})"
    lines = front + [
        "", f"# DVP-VAE, `{summary['preset']}` preset", "",
        "A hierarchical VAE with a diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024), trained with",
        "[dvp_fast](https://github.com/) and exported by `dvp-export`.", "",
        "| | |", "|---|---|",
        f"| preset | `{summary['preset']}` |",
        f"| data | {_data_text(summary['data'])} |",
        f"| training | {summary['steps']} steps of batch {summary['batch_size']} |",
        f"| weights | {weights}, from `{summary['source_checkpoint']}` |",
        f"| validation loss | {val_text} |",
    ]
    evaluations = summary["evaluations"]
    if evaluations:
        for e in evaluations:
            se = f" ± {e['nll_stderr']:.3f}" if e.get("nll_stderr") is not None else ""
            lines.append(f"| {e['split']} NLL ({e['data']}) | {e['nll']:.3f}{se} nats = "
                         f"{e['bits_per_dim']:.4f} bits/dim, IWAE with {e['num_samples']} importance samples on "
                         f"{e['images']} images ({e['date']}) |")
    else:
        lines.append("| test NLL | not evaluated (`dvp-eval --checkpoint RUN` before exporting adds it) |")
    lines += ["", "## Use", "", "```python", "from dvp_fast import DVPVAE", "",
              f"model = DVPVAE.from_pretrained({where!r})  # a local folder, or the Hub repo id it was pushed to",
              "images = model.eval().sample(16)  # (16, C, H, W) in [-1, 1]", "```", "",
              "Loading reads `model.safetensors` and `config.json` only: nothing is unpickled.", ""]
    return "\n".join(lines)


def export(args) -> None:
    path = resolve_checkpoint(args.checkpoint)
    payload = load_checkpoint(path)
    model = DVPVAE.from_checkpoint_payload(payload, path, ema=not args.raw_weights)
    out = args.out
    if os.path.isfile(out):
        raise FileExistsError(f"--out {out} is a file: expected a folder to create")
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    others = [name for name in present if name not in OUR_FILES]
    if others or (present and not args.force):
        what = f"holds {', '.join(others[:5])}" if others else "already holds an export (--force replaces it)"
        raise FileExistsError(f"--out {out} {what}: choose a new folder")
    summary = run_summary(path, payload, ema=not args.raw_weights)
    model.save_pretrained(out, metadata=summary)
    atomic_write_bytes(os.path.join(out, CARD_NAME), model_card(summary, out).encode())
    print(f"dvp-export: {os.path.join(out, '')} holds {', '.join(OUR_FILES)} ({summary['weights']} weights of "
          f"{path}, step {summary['steps']}); load it with DVPVAE.from_pretrained({out!r})")


def export_main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="dvp-export", description="Write a run's weights as a shareable folder "
                                                     "(model.safetensors, config.json, a model card README.md).")
    p.add_argument("--checkpoint", required=True, help="run folder (uses best.pt) or a .pt file")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--raw-weights", action="store_true", help="export the training weights, not their EMA")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return _run("dvp-export", export, p.parse_args(argv))
