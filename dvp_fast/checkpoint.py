"""Checkpoints that are written atomically and explain themselves when they cannot be read.

A checkpoint is a dict saved with torch.save. It always carries `format_version`,
`model_config` and the model weights; training checkpoints add the EMA weights,
optimiser, scheduler, RNG states and the position in the data. Since format 2 everything
in it is a tensor or a plain Python value, so it loads with `torch.load(weights_only=True)`,
which unpickles no objects and so runs no code from the file: that is the only way this
module loads one. Format-1 files (which held numpy RNG state) are refused with the command
that converts a trusted one: `python -m dvp_fast upgrade-checkpoint --trust FILE`.

torch.save writes a zip archive whose members carry CRC-32 checksums that torch.load
never verifies; `load_checkpoint` verifies them, so a truncated file or a flipped bit in
the weights is reported instead of being loaded as different numbers.
"""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import sys
import zipfile

import torch

from .atomic import atomic_write, fsync_dir

FORMAT_VERSION = 2
LAST, BEST = "last.pt", "best.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, truncated or of an unknown format."""


def _temporary_name(path: str, pid: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{pid}")


def save_checkpoint(payload: dict, path: str) -> None:
    """Write `payload` to `path` atomically: a temporary file, fsync, rename, fsync of the folder.

    If anything fails (a full disk, say) the previous file at `path` is untouched and the
    OSError names the file; a process killed mid-write leaves only a temporary file, which
    `remove_stale_temporaries` deletes.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temporary_name(path, os.getpid())
    payload = {"format_version": FORMAT_VERSION, **payload}
    try:
        atomic_write(path, lambda f: torch.save(payload, f), tmp=tmp)
    except OSError as exc:
        kept = "the previous one is untouched" if os.path.exists(path) else "no earlier one exists"
        raise OSError(exc.errno, f"cannot write checkpoint {path} ({exc.strerror or exc}); {kept}") from exc
    fsync_dir(folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files of checkpoint writes whose process has died; returns their paths."""
    removed = []
    for tmp in glob.glob(os.path.join(folder, ".*.pt.tmp*")):
        pid = tmp.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # a live writer (another rank's or process's): not ours to remove
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


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


def _verify_archive(path: str) -> None:
    """Check the zip structure and every member's CRC-32 (about 0.1 s per 10 MB)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({size} bytes; truncated or not written by "
                              f"torch.save?): {exc}") from exc
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: checksum mismatch in its member {bad!r}")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and sanity-check a checkpoint written by `save_checkpoint`.

    Raises FileNotFoundError for a missing file, CheckpointError (a ValueError) for a
    truncated, corrupt, foreign or newer-format one, each naming the file.
    """
    _verify_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only met an object it will not build
        raise CheckpointError(f"{path}: refused: it holds pickled objects, and unpickling them could run code (a "
                              f"checkpoint of dvp_fast's format 1, or not dvp_fast's); if you trust the file, convert "
                              f"it with: python -m dvp_fast upgrade-checkpoint --trust {path}") from exc
    except Exception as exc:  # damaged or foreign data raises almost any type
        raise CheckpointError(f"{path}: not a readable dvp_fast checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "format_version" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a dvp_fast checkpoint (expected a dict with format_version and "
                              f"model_config, got {_describe(payload)})")
    version = payload["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}, expected an integer >= 1")
    if version < 2:
        raise CheckpointError(f"{path}: refused: checkpoint format {version} may hold pickled objects; if you trust "
                              f"the file, convert it with: python -m dvp_fast upgrade-checkpoint --trust {path}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this dvp_fast understands "
                              f"({FORMAT_VERSION}); upgrade dvp_fast")
    if not isinstance(payload["model_config"], dict):
        raise CheckpointError(f"{path}: model_config must be a dict, got {type(payload['model_config']).__name__}")
    return payload


def require_keys(payload: dict, path: str, keys: tuple[str, ...], what: str) -> None:
    """CheckpointError naming the keys a `what` needs but `payload` lacks."""
    missing = [k for k in keys if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a {what}: missing {', '.join(missing)}")


def _describe(payload) -> str:
    if isinstance(payload, dict):
        return f"a dict with keys {sorted(map(str, payload))[:8]}"
    return f"a {type(payload).__name__}"


# --- converting format-1 checkpoints, for files the user trusts ------------------------------------------------
def _plain_rng(rng: dict) -> dict:
    """Format 1's RNG entry (numpy's state as an ndarray tuple) in format 2's tensors and plain values."""
    out = dict(rng)
    numpy_state = rng.get("numpy")
    if isinstance(numpy_state, tuple):
        import numpy as np

        kind, keys, pos, has_gauss, cached = numpy_state
        out["numpy"] = dict(kind=str(kind), keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached_gaussian=float(cached))
    python_state = rng.get("python")
    if isinstance(python_state, tuple):
        out["python"] = [int(python_state[0]), [int(v) for v in python_state[1]], python_state[2]]
    return out


def upgrade_checkpoint(path: str) -> str:
    """Rewrite a trusted format-1 checkpoint at `path` in format 2; the original is kept as PATH.format1.

    This unpickles the file (weights_only=False): call it only on files you trust.
    """
    _verify_archive(path)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "format_version" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a dvp_fast checkpoint ({_describe(payload)})")
    if payload["format_version"] != 1:
        raise CheckpointError(f"{path}: format {payload['format_version']!r}, only format 1 needs upgrading")
    if "rng" in payload:
        payload["rng"] = _plain_rng(payload["rng"])
    payload.pop("format_version")
    backup = path + ".format1"
    if os.path.exists(backup):
        raise FileExistsError(f"{backup} exists: move it away first (it may be an earlier original)")
    os.link(path, backup) if hasattr(os, "link") else __import__("shutil").copy2(path, backup)
    save_checkpoint(payload, path)
    torch.load(path, map_location="cpu", weights_only=True)  # the promise of format 2, checked
    return backup


def upgrade_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dvp_fast upgrade-checkpoint",
                                description="Rewrite trusted format-1 dvp_fast checkpoints in format 2, in place "
                                            "(the originals kept as *.format1).")
    p.add_argument("--trust", action="store_true", required=True,
                   help="required: the files are unpickled, which runs any code they hold")
    p.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    for path in args.paths:
        try:
            backup = upgrade_checkpoint(path)
        except (OSError, CheckpointError, pickle.UnpicklingError) as exc:
            print(f"upgrade-checkpoint: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        print(f"upgrade-checkpoint: {path} is now format {FORMAT_VERSION} (original kept as {backup})")
    return 0

