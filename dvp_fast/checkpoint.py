"""Checkpoints that are written atomically and explain themselves when they cannot be read.

A checkpoint is a dict saved with torch.save. It always carries `format_version`,
`model_config` and the model weights; training checkpoints add the EMA weights,
optimiser, scheduler, RNG states and the position in the data.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, truncated or of an unknown format."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(payload: dict, path: str) -> None:
    """Write `payload` to `path` atomically: a temporary file, fsync, rename, fsync of the folder.

    If anything fails (a full disk, say) the previous file at `path` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    payload = {"format_version": FORMAT_VERSION, **payload}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def resolve_checkpoint(path_or_dir: str, prefer: str = BEST) -> str:
    """A file path, or for a run folder its `prefer` checkpoint (falling back to the other one)."""
    if os.path.isdir(path_or_dir):
        for name in (prefer, LAST if prefer == BEST else BEST):
            candidate = os.path.join(path_or_dir, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"no checkpoint in run folder {path_or_dir}: expected {BEST} or {LAST}")
    if not os.path.isfile(path_or_dir):
        raise FileNotFoundError(f"checkpoint not found: {path_or_dir}")
    return path_or_dir


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and sanity-check a checkpoint written by `save_checkpoint`."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable dvp_fast checkpoint (corrupt or truncated?): {exc}") from exc
    if not isinstance(payload, dict) or "format_version" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a dvp_fast checkpoint (missing format_version/model_config)")
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r} is newer than this dvp_fast understands "
                              f"({FORMAT_VERSION}); upgrade dvp_fast")
    return payload
