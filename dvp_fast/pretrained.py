"""Shareable weights: a folder with `model.safetensors` and `config.json`, the Hugging Face Hub's layout.

Nothing here unpickles: safetensors is a flat table of tensors and JSON is text, so loading a
folder from anyone runs none of their code. A folder pushed to the Hub as it is (for example
`huggingface-cli upload USER/NAME DIR`) loads by its repo id; huggingface_hub is needed only
for that (`pip install "dvp_fast[hub]"`).
"""
from __future__ import annotations

import json
import os
import re


from .checkpoint import CheckpointError
from .atomic import atomic_write_bytes

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PRETRAINED_FORMAT = "dvp_fast.pretrained"
PRETRAINED_VERSION = 1
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # a --no-deps install
        raise ImportError("shareable weights need the 'safetensors' package (pip install safetensors)") from exc
    return safetensors.torch


def save_pretrained(model, folder: str, metadata: dict | None = None) -> list[str]:
    """Write `model`'s weights and configuration into `folder` (created if needed); returns the paths.

    `metadata` (plain JSON values) is stored in config.json under "training", for the model card.
    """
    from . import __version__

    os.makedirs(folder, exist_ok=True)
    # safetensors refuses tensors that share memory or are not contiguous: store plain copies.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    weights = _safetensors().save(state, metadata={"format": "pt", "library": "dvp_fast"})
    config = {"format": PRETRAINED_FORMAT, "format_version": PRETRAINED_VERSION, "dvp_fast_version": __version__,
              "model": model.config.to_dict()}
    if metadata:
        config["training"] = metadata
    paths = [os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, CONFIG_NAME)]
    atomic_write_bytes(paths[0], weights)
    atomic_write_bytes(paths[1], (json.dumps(config, indent=2) + "\n").encode())
    return paths


def _fetch_from_hub(repo_id: str, revision: str | None) -> str:
    """Download config.json and model.safetensors of a Hub repo (cached); returns the local folder."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local folder, and loading a repo id from the Hugging Face Hub needs "
                          f"huggingface_hub: pip install \"dvp_fast[hub]\"") from None
    try:
        config_path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision)
    except Exception as exc:  # offline, unknown repo, gated, missing file: all one line
        reason = " ".join(str(exc).split())[:300]
        raise OSError(f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {reason}); "
                      f"without a network, pass the path of a local folder instead") from None
    return os.path.dirname(config_path)


def resolve_pretrained(name_or_path: str, revision: str | None = None) -> str:
    """The local folder of `name_or_path`: itself if it is a folder, else the Hub repo's download."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{name_or_path} is a file: from_pretrained expects a folder with {WEIGHTS_NAME} and "
                         f"{CONFIG_NAME} (for a dvp-train checkpoint use DVPVAE.from_checkpoint)")
    if not _REPO_ID.match(name_or_path):
        raise FileNotFoundError(f"no folder {name_or_path} (and it is not a Hub repo id of the form owner/name)")
    return _fetch_from_hub(name_or_path, revision)


def read_config(folder: str) -> dict:
    """The parsed config.json of a pretrained folder, checked for its format."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME}: not a dvp_fast pretrained folder (write one with "
                                f"model.save_pretrained or dvp-export)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT or "model" not in config:
        raise CheckpointError(f"{path}: not a dvp_fast config (expected \"format\": \"{PRETRAINED_FORMAT}\" and a "
                              f"\"model\" entry)")
    version = config.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= PRETRAINED_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not one this dvp_fast reads "
                              f"(1..{PRETRAINED_VERSION}); upgrade dvp_fast")
    return config


def load_pretrained(cls, name_or_path: str, map_location="cpu", revision: str | None = None):
    """Build a `cls` (DVPVAE) from a pretrained folder or Hub repo id. Unpickles nothing."""
    from .config import DVPConfig

    folder = resolve_pretrained(name_or_path, revision)
    config = read_config(folder)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME} (pickled weights such as pytorch_model.bin are "
                                f"never loaded: they can run code)")
    try:
        model_config = DVPConfig.from_dict(config["model"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}/{CONFIG_NAME}: its model configuration is not valid here: {exc}") from exc
    try:
        state = _safetensors().load_file(weights_path, device="cpu")
    except ImportError:
        raise
    except Exception as exc:  # truncated or not a safetensors file
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]})") from exc
    model = cls(model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path}: weights do not fit {CONFIG_NAME}: "
                              f"{' '.join(str(exc).split())[:500]}") from exc
    return model.to(map_location)
