"""Argument checks shared by the model, evaluation and training: each names what it expected and what came."""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import DVPConfig
    from .model import DVPVAE


def positive_int(name: str, value) -> int:
    """`value` as an int >= 1, or a ValueError naming it (2.5, "8" and True are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def temperature(value) -> float:
    if not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {value!r}")
    return float(value)


def model_input(model: DVPVAE, x: torch.Tensor, name: str = "x") -> None:
    """x must be a float (B, C, H, W) batch in [-1, 1] of the model's image shape, device and dtype (the
    range is checked, with one host sync, only while model.validate_inputs is set)."""
    cfg = model.config
    expected = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {expected[0]}, {expected[1]}, "
                        f"{expected[2]}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {x.dtype} "
                        f"(convert uint8 images with x.float() / 127.5 - 1)")
    if x.dim() != 4 or tuple(x.shape[1:]) != expected or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) for the "
                         f"{cfg.name!r} configuration, got {tuple(x.shape)}")
    if x.device != model.device:
        raise ValueError(f"{name} is on {x.device} but the model is on {model.device}")
    weight_dtype = model.likelihood_head.weight.dtype
    if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the model's weights are {weight_dtype}: convert it "
                        f"with {name}.to({weight_dtype}) (or run under torch.autocast for mixed precision)")
    if model.validate_inputs and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()  # one host sync for both checks
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or infinite values")
        if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")


def likelihood_target(model: DVPVAE, target: torch.Tensor, x: torch.Tensor) -> None:
    """target must be a float tensor like x, in the range of the model's likelihood."""
    if not isinstance(target, torch.Tensor) or not target.is_floating_point():
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target must be a floating-point tensor like x, got {got}")
    if target.shape != x.shape or target.device != x.device:
        raise ValueError(f"target must match x: shape {tuple(x.shape)} on {x.device}, got shape "
                         f"{tuple(target.shape)} on {target.device}")
    if model.validate_inputs and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(target.detach())).tolist()
        want = (0.0, 1.0) if model.config.likelihood == "bernoulli" else (-1.0, 1.0)
        if not (want[0] <= lo and hi <= want[1]):  # also false for NaN
            raise ValueError(f"target must lie in [{want[0]:g}, {want[1]:g}] for the {model.config.likelihood} "
                             f"likelihood, got values in [{lo:.4g}, {hi:.4g}]")


def uint8_images(images, cfg: DVPConfig, source: str) -> torch.Tensor:
    """`images` if they are uint8 (N, C, H, W) of the shape `cfg` models, else one ValueError saying so."""
    expected = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{source}: expected a uint8 torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{source}: expected uint8 images in [0, 255], got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        kind = {1: "grayscale", 3: "RGB"}.get(cfg.image_channels, f"{cfg.image_channels}-channel")
        raise ValueError(f"{source}: a tensor of shape {tuple(images.shape)}, but preset {cfg.name!r} expects "
                         f"{kind} images of shape {expected}, at least one (images are not resized)")
    return images
