"""The embedded dataset: 5,000 real MNIST digits shipped in this package (mnist_5k.npz), for a
machine with no data and no network. Where they come from and their licence: mnist_5k.md.

    images, labels = load_embedded("train")    # uint8 (4000, 1, 28, 28), int64 (4000,)
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .splits import check_split

EMBEDDED_FILE = "mnist_5k.npz"
EMBEDDED_COUNT = 5000
EMBEDDED_TRAIN, EMBEDDED_VAL = 4000, 500  # of the 5,000 digits; the remaining 500 are the test split
EMBEDDED_SPLIT_SEED = 0


def embedded_path() -> str:
    """Path of the 5,000 MNIST digits shipped with dvp_fast (mnist_5k.npz: `images`, `labels`)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), EMBEDDED_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"the embedded dataset file is missing: expected {path} (package data of "
                                f"dvp_fast.data; reinstall dvp_fast)")
    return path


def read_embedded() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits in file order: (images uint8 (5000, 28, 28), labels uint8 (5000,))."""
    path = embedded_path()
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise ValueError(f"cannot read the embedded dataset {path}: {exc}") from exc
    if images.dtype != np.uint8 or images.shape != (EMBEDDED_COUNT, 28, 28) or labels.dtype != np.uint8 \
            or labels.shape != (EMBEDDED_COUNT,) or labels.max() > 9:
        raise ValueError(f"{path}: expected uint8 images (5000, 28, 28) and uint8 labels 0..9 (5000,), got "
                         f"{images.dtype} {images.shape} and {labels.dtype} {labels.shape}")
    return images, labels


def load_embedded(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)): 4,000 train / 500 val / 500 test.

    The 5,000 digits are permuted once with `EMBEDDED_SPLIT_SEED` (the same on every machine):
    the first 4,000 are train, the next 500 val, the last 500 test, so the three are disjoint
    and best.pt (chosen on val) is never selected on the digits `dvp-eval` reports as test.
    Each split keeps the permuted order. The test split is the 500 digits it has always been.
    """
    check_split(split)
    images, labels = read_embedded()
    order = np.random.default_rng(EMBEDDED_SPLIT_SEED).permutation(images.shape[0])
    bounds = {"train": (0, EMBEDDED_TRAIN), "val": (EMBEDDED_TRAIN, EMBEDDED_TRAIN + EMBEDDED_VAL),
              "test": (EMBEDDED_TRAIN + EMBEDDED_VAL, images.shape[0])}[split]
    rows = order[bounds[0]:bounds[1]]
    return (torch.from_numpy(images[rows].reshape(-1, 1, 28, 28)),
            torch.from_numpy(labels[rows].astype(np.int64)))
