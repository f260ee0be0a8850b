"""The normaliser S of the DCT pseudo-inputs, fitted once per (data, d, D, variant) and cached on disk.

    fit_scale_cached(model, train_images, "mnist", "train")   # sets model.pseudo.scale; a hit skips the pass

Entries live in `default_cache_dir()/scales/` ($DVP_FAST_CACHE, else ~/.cache/dvp_fast), one torch
file per key, written atomically; an unreadable or invalid entry is recomputed with a warning.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import warnings

import torch

from .atomic import atomic_write_bytes


def default_cache_dir() -> str:
    return os.environ.get("DVP_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dvp_fast")


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


__all__ = ["fit_scale_cached", "content_hash", "default_cache_dir", "SCALE_CACHE_VERSION"]
