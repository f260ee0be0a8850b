"""The splits of the standard datasets: val drawn from the training file with a fixed seed.

    train_rows, val_rows = split_indices("mnist", 60000)     # 55,000 and 5,000 row indices, both sorted
"""
from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
VAL_SPLIT_SEED = 0
# (images in the standard training file, of which val) per dataset: fixes the val fraction.
STANDARD_VAL = {"mnist": (60000, 5000), "omniglot": (24345, 1000), "cifar10": (50000, 5000)}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def val_count(name: str, n: int) -> int:
    """Size of the val split drawn from a training file of n images (5,000 of MNIST's 60,000...)."""
    std_n, std_val = STANDARD_VAL[name]
    if n < 2:
        raise ValueError(f"{name}: a training file of {n} image(s) cannot be split into train and val")
    return min(max(round(n * std_val / std_n), 1), n - 1)


def split_indices(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) row indices of a training file of n images: val by a fixed-seed permutation."""
    k = val_count(name, n)
    perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])
