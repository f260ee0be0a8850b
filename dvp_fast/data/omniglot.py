"""OMNIGLOT: the IWAE `chardata.mat` (28x28 images as 784-float columns, one-hot alphabet labels).

    images, labels = load_omniglot_file("data/omniglot", "train")   # uint8 (24345, 1, 28, 28), int64 (24345,)
"""
from __future__ import annotations

import os

import numpy as np

from ..atomic import atomic_write_bytes
from .files import fetch, no_network_error

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
            _, body = fetch([OMNIGLOT_URL])
        except OSError as exc:
            raise no_network_error("omniglot", os.path.dirname(path), [OMNIGLOT_FILE], str(exc)) from exc
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
