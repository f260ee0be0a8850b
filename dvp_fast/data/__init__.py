"""Datasets as uint8 tensors (N, C, H, W): the registry of names, the splits, and the public loaders.

    images = load_images("mnist", "train", root="data/mnist")      # uint8 (55000, 1, 28, 28)
    batches = DeviceBatches(images, 250, "cuda", seed=0)
    for x in batches.batches(epoch):                                 # float [-1, 1] on the device
        ...

One module per format: mnist.py (IDX), omniglot.py (IWAE `chardata.mat`), cifar10.py (the
pickle batches), embedded.py (the 5,000 digits shipped in mnist_5k.npz), user.py (a user's own
folder:, npz: or npy: images); files.py (gzip, MD5, downloads), splits.py, batches.py. Files are
checked on the way in: headers, sizes, and for the standard full files the MD5 of the
*decompressed* content, so a re-gzipped copy still passes and a corrupt one never yields a
silently wrong array. Missing or corrupt files raise FileNotFoundError or ValueError naming the file.

Splits (val is always drawn with a fixed seed from the training file, so it is the
same on every machine; both parts keep file order):
    mnist     60,000 -> 55,000 train / 5,000 val; 10,000 test
    omniglot  24,345 -> 23,345 train / 1,000 val;  8,070 test
    cifar10   50,000 -> 45,000 train / 5,000 val; 10,000 test
    embedded   5,000 ->  4,000 train /   500 val;    500 test (one file, permuted once, see `load_embedded`)
A training file smaller than the standard one (a test fixture, a subset) gets the
same val fraction (1/12, 1000/24345, 1/10), at least one image each side.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .batches import DeviceBatches, epoch_order, to_float
from .cifar10 import load_cifar10_file
from .embedded import EMBEDDED_SPLIT_SEED, EMBEDDED_TRAIN, EMBEDDED_VAL, embedded_path, load_embedded
from .files import DOWNLOAD_TIMEOUT_S, md5_hex
from .mnist import load_mnist_file, parse_idx
from .omniglot import load_omniglot_file
from .splits import SPLITS, STANDARD_VAL, VAL_SPLIT_SEED, check_split, split_indices, val_count
from .user import USER_SPLITS, is_user_source, load_user_images, user_split

DATASETS = ("embedded", "mnist", "omniglot", "cifar10")
# Which model preset each dataset is meant for.
PRESET_OF = {"embedded": "mnist", "mnist": "mnist", "omniglot": "omniglot", "cifar10": "cifar10"}
IMAGE_SHAPE = {"embedded": (1, 28, 28), "mnist": (1, 28, 28), "omniglot": (1, 28, 28), "cifar10": (3, 32, 32)}
# The file-backed datasets: (loader(root, part, download), the training part, the test part).
_FILE_LOADERS = {"mnist": (load_mnist_file, "train", "t10k"), "omniglot": (load_omniglot_file, "train", "test"),
                 "cifar10": (load_cifar10_file, "train", "test")}


def default_data_root() -> str:
    """`$DVP_FAST_DATA`, else ~/.cache/dvp_fast/data; `load_images(name, root=None)` reads <this>/<name>."""
    return os.environ.get("DVP_FAST_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "dvp_fast", "data")


def check_data_name(name: str) -> str:
    """`name` if it is a dataset name or a user source (folder:PATH, npz:PATH, npy:PATH), else ValueError."""
    if name in DATASETS or is_user_source(name):
        return name
    raise ValueError(f"unknown dataset {name!r}: expected one of {list(DATASETS)}, or your own images as "
                     f"folder:PATH, npz:PATH or npy:PATH")


def load_dataset(name: str, split: str = "train", root: str | None = None, download: bool = False,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images uint8 (N, C, H, W), labels int64 (N,) or None where the files have none).

    `name` is a dataset name or a user source ("folder:PATH", "npz:PATH", "npy:PATH"); a user
    source has the splits "train", "val" (drawn with `seed`, see `user.user_split`) and
    "all", and no labels.
    """
    check_data_name(name)
    if is_user_source(name):
        return user_split(load_user_images(name), seed, split), None
    check_split(split)
    if name == "embedded":
        return load_embedded(split)
    loader, train_part, test_part = _FILE_LOADERS[name]
    root = os.path.expanduser(root) if root is not None else os.path.join(default_data_root(), name)
    images, labels = loader(root, test_part if split == "test" else train_part, download)
    if split != "test":
        train_rows, val_rows = split_indices(name, images.shape[0])
        rows = train_rows if split == "train" else val_rows
        images, labels = images[rows], (labels[rows] if labels is not None else None)
    return torch.from_numpy(np.ascontiguousarray(images)), (torch.from_numpy(labels) if labels is not None else None)


def load_images(name: str, split: str = "train", root: str | None = None, download: bool = False,
                seed: int = 0) -> torch.Tensor:
    """uint8 images (N, C, H, W) of dataset `name` ("embedded", "mnist", "omniglot", "cifar10"), or
    of a user source ("folder:PATH", "npz:PATH", "npy:PATH"; `seed` draws its val split).

    `root` is the folder of the dataset's files (default `default_data_root()/<name>`); `download`
    fetches missing standard files there where a network exists.
    """
    return load_dataset(name, split, root, download, seed)[0]


def load_labels(name: str, split: str = "train", root: str | None = None, download: bool = False) -> torch.Tensor:
    """int64 class labels (N,) aligned with `load_images` (OMNIGLOT: the alphabet, from 'target')."""
    labels = load_dataset(name, split, root, download)[1]
    if labels is None:
        raise ValueError(f"{name}: the {split} files hold no labels")
    return labels


__all__ = ["DATASETS", "SPLITS", "USER_SPLITS", "check_data_name", "is_user_source", "load_user_images", "user_split",
           "PRESET_OF", "IMAGE_SHAPE", "load_images", "load_labels", "load_dataset", "load_embedded", "embedded_path",
           "load_mnist_file", "load_omniglot_file", "load_cifar10_file", "parse_idx", "split_indices", "val_count",
           "DeviceBatches", "epoch_order", "to_float", "default_data_root", "md5_hex", "DOWNLOAD_TIMEOUT_S",
           "STANDARD_VAL", "VAL_SPLIT_SEED", "EMBEDDED_SPLIT_SEED", "EMBEDDED_TRAIN", "EMBEDDED_VAL"]
