"""MNIST: the four IDX files (gzipped or not) in a folder or its MNIST/raw, checked by header, size and MD5.

    images, labels = load_mnist_file("data/mnist", "train")    # uint8 (60000, 1, 28, 28), int64 (60000,)
"""
from __future__ import annotations

import os

import numpy as np

from ..atomic import atomic_write_bytes
from .files import check_md5, fetch, gunzip, no_network_error, read_file

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
            url, body = fetch([m + name + ".gz" for m in MNIST_MIRRORS])
        except OSError as exc:
            raise no_network_error("mnist", folder, [n + ".gz" for n, _ in missing[i:]], str(exc)) from exc
        check_md5(url, gunzip(body, url), md5)
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
    img_content, lab_content = read_file(img_path), read_file(lab_path)
    images = parse_idx(img_content, img_path, ndim=3)
    labels = parse_idx(lab_content, lab_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] == img_n:  # the standard full file: its checksum is known
        check_md5(img_path, img_content, img_md5)
    if labels.shape[0] == lab_n:
        check_md5(lab_path, lab_content, lab_md5)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{lab_path}: holds {labels.shape[0]} labels but {img_path} holds {images.shape[0]} images")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lab_path}: labels must be digits 0..9, found {int(labels.max())}")
    return images.reshape(-1, 1, 28, 28).copy(), labels.astype(np.int64)
