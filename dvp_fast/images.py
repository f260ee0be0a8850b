"""PNG sample grids, written with zlib alone (no imaging dependency)."""
from __future__ import annotations

import math
import os
import struct
import zlib

import torch

from .atomic import atomic_write_bytes


DISPLAY_SCALE = 2  # a 28x28 digit is too small to read on a screen at one pixel per pixel


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W', C) grid with `nrow` images per row, white padding; each
    image pixel drawn as scale x scale pixels (nearest neighbour: no new values)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    images = images.detach().repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    pix = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = pix[i]
    return grid.permute(1, 2, 0).contiguous()


def write_png(path: str, pixels: torch.Tensor) -> None:
    """Write uint8 (H, W, C) with C in {1, 3} as an 8-bit grayscale or RGB PNG (atomically)."""
    h, w, c = pixels.shape
    color_type = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + pixels[y].numpy().tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    atomic_write_bytes(path, png, tmp=f"{path}.tmp{os.getpid()}")


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int = DISPLAY_SCALE) -> str:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid, each pixel `scale` x `scale`; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_png(path, make_grid(images, nrow, scale=scale))
    return path
