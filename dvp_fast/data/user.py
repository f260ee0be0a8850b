"""A user's own images: `folder:PATH` (PNG/JPEG files), `npz:PATH` or `npy:PATH` (uint8 arrays).

    images = load_user_images("folder:~/digits")     # uint8 (N, C, H, W), every file checked
    train, val = user_split(images, seed=0)           # val: a seeded 10%, at least one image

Images are never resized or converted between grayscale and colour: a file of another size or
mode is an error that names it, so that what the model trains on is exactly what is on disk.
Grayscale ("L", and 1-bit images as 0/255) gives C = 1, RGB gives C = 3; anything else (alpha,
palette, 16-bit) is refused with the file's name and mode.
"""
from __future__ import annotations

import os

import numpy as np
import torch

SOURCES = ("folder", "npz", "npy")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
USER_SPLITS = ("train", "val", "all")
VAL_FRACTION = 0.1


def is_user_source(spec: str) -> bool:
    return isinstance(spec, str) and spec.split(":", 1)[0] in SOURCES and ":" in spec


def parse_source(spec: str) -> tuple[str, str]:
    """'folder:PATH' -> ('folder', expanded PATH); ValueError for anything else."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SOURCES or not path:
        raise ValueError(f"expected a data source folder:PATH, npz:PATH or npy:PATH, got {spec!r}")
    return kind, os.path.expanduser(path)


def load_user_images(spec: str) -> torch.Tensor:
    """All images of a user source as uint8 (N, C, H, W), checked for one shape and mode."""
    kind, path = parse_source(spec)
    if kind == "folder":
        return _load_folder(path)
    return _to_nchw(_load_array(kind, path), path)


def user_split(images: torch.Tensor, seed: int, split: str) -> torch.Tensor:
    """The `split` ("train", "val" or "all") of a user's images; val is a `seed`-drawn VAL_FRACTION."""
    if split not in USER_SPLITS:
        raise ValueError(f"a user's data has the splits {list(USER_SPLITS)}, not {split!r} (to evaluate on held-out "
                         f"images, put them in their own folder or file and use split 'all')")
    if split == "all":
        return images
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"{n} image(s) cannot be split into train and val: at least 2 are needed")
    k = min(max(round(n * VAL_FRACTION), 1), n - 1)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    rows = perm[:k] if split == "val" else perm[k:]
    return images[rows.sort().values]


# --- arrays -------------------------------------------------------------------------------------------
def _load_array(kind: str, path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {kind} file {path}")
    try:
        loaded = np.load(path, allow_pickle=False)  # never unpickle a user's file
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .{kind} file ({' '.join(str(exc).split())})") from exc
    if kind == "npy":
        if not isinstance(loaded, np.ndarray):
            raise ValueError(f"{path}: expected one array (.npy), got an archive")
        return loaded
    if not hasattr(loaded, "files"):
        raise ValueError(f"{path}: expected an .npz archive, got a single array (use npy:{path})")
    with loaded:
        keys = list(loaded.files)
        if keys == []:
            raise ValueError(f"{path}: the .npz archive holds no arrays")
        key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path}: the .npz archive holds {keys}: expected one array, or one named 'images'")
        return loaded[key]


def _to_nchw(array: np.ndarray, path: str) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels in [0, 255], got dtype {array.dtype} (convert with "
                         f"np.clip(a, 0, 255).astype(np.uint8) after scaling)")
    shape = array.shape
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        channels_first = shape[1] in (1, 3) and shape[2] == shape[3]
        channels_last = shape[3] in (1, 3) and shape[1] == shape[2]
        if channels_last and not channels_first:
            array = array.transpose(0, 3, 1, 2)
        elif not channels_first:
            raise ValueError(f"{path}: expected square images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) "
                             f"with C = 1 or 3, got shape {shape}")
    else:
        raise ValueError(f"{path}: expected (N, H, W), (N, H, W, C) or (N, C, H, W) uint8 images, got shape {shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{path}: holds no images (shape {shape})")
    if array.shape[2] != array.shape[3]:
        raise ValueError(f"{path}: expected square images, got {array.shape[2]}x{array.shape[3]} (shape {shape})")
    return torch.from_numpy(np.ascontiguousarray(array))


# --- a folder of image files -----------------------------------------------------------------------------------
def _image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ValueError(f"{folder}: no image files (expected .png, .jpg or .jpeg, in it or in class subfolders)")
    return found


def _read_image(path: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading a folder of images needs Pillow (pip install pillow)") from exc
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "1":
                image = image.convert("L")
            elif mode not in ("L", "RGB"):
                raise ValueError(f"{path}: image mode {mode!r}, expected grayscale ('L') or 'RGB' (images are not "
                                 f"converted: save it as one of those)")
            return np.asarray(image, dtype=np.uint8)
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for unreadable files
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc


def _load_folder(folder: str) -> torch.Tensor:
    files = _image_files(folder)
    first = _read_image(files[0])
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, path in enumerate(files[1:], start=1):
        image = _read_image(path)
        if image.shape != first.shape:
            raise ValueError(f"{path}: {_describe(image.shape)}, but {files[0]} (the first file) is "
                             f"{_describe(first.shape)}: all images must have one size and mode (none is resized)")
        out[i] = image
    return _to_nchw(out, folder)


def _describe(shape: tuple) -> str:
    kind = "RGB" if len(shape) == 3 else "grayscale"
    return f"{kind} {shape[1]}x{shape[0]}"
