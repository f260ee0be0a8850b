"""Batches for training and evaluation: a uint8 dataset held on the device, shuffled per (seed, epoch).

    batches = DeviceBatches(images, 250, "cuda", seed=0)
    for x in batches.batches(epoch, start=k):    # float32 [-1, 1] on the device, from batch k on
        ...
"""
from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The visiting order of one epoch (CPU int64), a pure function of (seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def check_batch_args(images: torch.Tensor, batch_size: int, drop_last: bool) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and images.shape[0] < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} images of the dataset")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.float() / 127.5 - 1.0


class DeviceBatches:
    """Shuffled batches of a uint8 dataset held on `device`, converted to [-1, 1] floats there.

    Batch order depends only on (seed, epoch): `batches(epoch, start=k)` skips the first k
    batches, which is how a resumed run continues mid-epoch. drop_last semantics.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device | str, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        check_batch_args(images, batch_size, drop_last)
        self.images = images.to(device)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.device = torch.device(device)

    def __len__(self) -> int:
        return num_batches(self.images.shape[0], self.batch_size, self.drop_last)

    def batches(self, epoch: int, start: int = 0):
        order = epoch_order(self.images.shape[0], self.seed, epoch, self.shuffle).to(self.device)
        for i in range(start, len(self)):
            yield to_float(self.images[order[i * self.batch_size:(i + 1) * self.batch_size]])
