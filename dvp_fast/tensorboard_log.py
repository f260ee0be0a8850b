"""dvp-train --tensorboard: the run's scalars and sample grids as TensorBoard event files, beside
metrics.csv (`tensorboard --logdir runs/`). Optional: needs the tensorboard package
(`pip install -e ".[tensorboard]"`)."""
from __future__ import annotations

import importlib.util

import torch

from .learning_curve import layer_names

# metrics.csv's columns that go to TensorBoard, under these tags.
SCALARS = {"loss": "train/loss_bits_per_dim", "elbo": "train/elbo_nats", "recon": "train/recon_nats",
           "kl": "train/kl_nats", "grad_norm": "train/grad_norm", "lr": "train/lr", "images_per_s": "train/images_per_s",
           "val_loss": "val/loss_bits_per_dim", "val_elbo": "val/elbo_nats", "active_units": "val/active_units"}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoard:
    """A SummaryWriter on the run folder; each row of metrics.csv becomes scalars at its step."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def scalars(self, row: dict) -> None:
        for key, tag in SCALARS.items():
            value = row.get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, row["step"])

    def evaluation(self, step: int, ev: dict, layers: dict, grids: dict[str, torch.Tensor]) -> None:
        """Per-layer KL and active units, and the evaluation's sample grids (images in [-1, 1])."""
        names = layer_names(len(layers["kl"]))
        for name, kl in zip(names, layers["kl"]):
            self.writer.add_scalar(f"layers/kl_nats/{name}", kl, step)
        for name, au in zip(names[1:], layers["active_units"]):
            self.writer.add_scalar(f"layers/active_units/{name}", au, step)
        for name, images in grids.items():
            self.writer.add_images(f"images/{name}", (images.float().cpu() + 1) / 2, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
