"""CIFAR-10: the python pickle batches in cifar-10-batches-py/, unpickled with only numpy's globals allowed.

    images, labels = load_cifar10_file("data/cifar10", "train")     # uint8 (50000, 3, 32, 32), int64 (50000,)
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import tarfile
import zlib

import numpy as np

from ..atomic import atomic_write_bytes
from .files import check_md5, fetch, no_network_error

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
# MD5s of the extracted batch files, as published with torchvision's CIFAR10 dataset class
# (the archive itself: c58f30108f718f92721af3b95e74349a, not used: a re-compressed copy differs).
CIFAR_FILES = {
    "train": (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
              ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
              ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
              ("data_batch_4", "634d18415352ddfa80567beed471001a"),
              ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
    "test": (("test_batch", "40351d587109b95175f43aff81a1287e"),),
}
CIFAR_STANDARD_BATCH = 10000
# The only globals a CIFAR batch pickle needs (numpy arrays, from Python 2 or 3); anything else
# is refused before it can run, so a crafted file cannot execute code.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if module.startswith("numpy.core"):  # renamed numpy._core in numpy 2
            try:
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core", 1)), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _cifar_folder(root: str) -> str:
    if os.path.basename(os.path.normpath(root)) == CIFAR_FOLDER or os.path.exists(os.path.join(root, "test_batch")) \
            or os.path.exists(os.path.join(root, "data_batch_1")):
        return root
    return os.path.join(root, CIFAR_FOLDER)


def _read_cifar_batch(path: str, md5: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"cifar10: missing {path}; expected data_batch_1..5 and test_batch in "
                                f"{os.path.dirname(path)} (from {CIFAR_URL}), or pass download=True (--download on "
                                f"the command line)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        entry = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # truncated, not a pickle, or a refused global
        raise ValueError(f"{path}: not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels', got {type(entry).__name__}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(f"{path}: expected keys 'data' (uint8 N x 3072) and 'labels', found {sorted(map(str, entry))}")
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: 'labels' must be {data.shape[0]} integers in 0..9, got {labels.dtype} "
                         f"{labels.shape}")
    if data.shape[0] == CIFAR_STANDARD_BATCH:  # a full batch: its checksum is known
        check_md5(path, raw, md5)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download_cifar(folder: str) -> None:
    names = [n for part in CIFAR_FILES.values() for n, _ in part]
    if all(os.path.exists(os.path.join(folder, n)) for n in names):
        return
    try:
        _, body = fetch([CIFAR_URL])
    except OSError as exc:
        raise no_network_error("cifar10", folder, names, str(exc)) from exc
    try:
        archive = tarfile.open(fileobj=io.BytesIO(body), mode="r:gz")
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
        contents = {}
        for name, md5 in (f for part in CIFAR_FILES.values() for f in part):
            member = members.get(f"{CIFAR_FOLDER}/{name}")
            if member is None:
                raise ValueError(f"{CIFAR_URL}: the archive has no {CIFAR_FOLDER}/{name}")
            contents[name] = archive.extractfile(member).read()
            check_md5(f"{CIFAR_URL}:{CIFAR_FOLDER}/{name}", contents[name], md5)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{CIFAR_URL}: corrupt archive ({exc})") from exc
    for name, content in contents.items():  # written by us, never extracted by path: no traversal
        atomic_write_bytes(os.path.join(folder, name), content)


def load_cifar10_file(root: str, part: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of the "train" (5 batches) or "test" files."""
    folder = _cifar_folder(root)
    if download:
        _download_cifar(folder)
    batches = [_read_cifar_batch(os.path.join(folder, name), md5) for name, md5 in CIFAR_FILES[part]]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
