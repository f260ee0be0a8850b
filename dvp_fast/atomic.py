"""Atomic file writes: a temporary file beside the target, flushed and fsynced, then renamed over it.

    atomic_write_bytes("out/config.json", text.encode())     # readers see the old file or the new one
    atomic_write(path, lambda f: torch.save(obj, f), tmp=f"{path}.tmp{os.getpid()}")

A write that fails (a full disk, an exception in `write`, a KeyboardInterrupt) removes its temporary
file and leaves whatever was at the target untouched. Every file the commands and runs write goes
through here: checkpoints, the run folder's CSVs, JSON and figures, PNG grids and sample tensors,
evaluations.json, shareable weights, model cards, the normaliser cache and dataset downloads.
"""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def fsync_dir(folder: str) -> None:
    """fsync a folder (so that a rename in it survives a power cut); silently skipped where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None], tmp: str | None = None) -> None:
    """Call `write(f)` on a binary temporary file, fsync it, and rename it to `path`.

    `tmp` names the temporary file (it must be in the target's folder; the folder is not created);
    by default it is a fresh `<name>.XXXX.part` beside `path`, the folder created if needed.
    """
    if tmp is None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".part")
        opened = os.fdopen(fd, "wb")
    else:
        opened = None
    try:
        with opened if opened is not None else open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str, content: bytes, tmp: str | None = None) -> None:
    """Write `content` to `path` atomically (the folder is created if needed; `tmp` as for atomic_write)."""
    atomic_write(path, lambda f: f.write(content), tmp=tmp)


__all__ = ["atomic_write", "atomic_write_bytes", "fsync_dir"]
