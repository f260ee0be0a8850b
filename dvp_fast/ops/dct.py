"""DCT pseudo-inputs: Algorithm 1 (`dct_crop`) and Algorithm 2 (`idct_pad`) of the paper.

The orthonormal type-II DCT of a D x D channel X is A X A^T with
A[k, n] = sqrt(1/D) for k = 0 and sqrt(2/D) cos(pi (n + 1/2) k / D) otherwise
(the same transform as ``scipy.fft.dctn(type=2, norm="ortho")``). Cropping the
top-left d x d block of the full transform equals A_d X A_d^T with A_d the first
d rows of A, and zero-padding followed by the inverse equals A_d^T U A_d, so
neither op ever builds the D x D transform.
"""
from __future__ import annotations

import math

import torch

from ._backend import choose_backend, implementation
from ._checks import check_floating, check_int, check_same_device, check_shape

_BASIS_CACHE: dict[tuple, torch.Tensor] = {}


def dct_basis(rows: int, size: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A_d: the first `rows` rows of the orthonormal DCT-II matrix of `size` points, (rows, size)."""
    key = (rows, size, dtype, torch.device(device))
    basis = _BASIS_CACHE.get(key)
    if basis is None:
        k = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
        n = torch.arange(size, dtype=torch.float64).unsqueeze(0)
        basis = torch.cos(math.pi * (n + 0.5) * k / size) * math.sqrt(2.0 / size)
        basis[0] = math.sqrt(1.0 / size)
        basis = basis.to(dtype=dtype, device=device)
        _BASIS_CACHE[key] = basis
    return basis


def _check_dct_args(x: torch.Tensor, scale: torch.Tensor) -> None:
    check_floating("dct_crop", "x", x)
    check_floating("dct_crop", "scale", scale)
    check_shape("dct_crop", "x", x, "(B, C, D, D)", ndim=4)
    check_same_device("dct_crop", x=x, scale=scale)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dct_crop: x must be square (B, C, D, D), got shape {tuple(x.shape)}")
    if scale.dim() != 3 or scale.shape[0] != x.shape[1] or scale.shape[1] != scale.shape[2]:
        raise ValueError(f"dct_crop: scale must be (C, d, d) with C = {x.shape[1]}, got shape {tuple(scale.shape)}")
    if scale.shape[-1] > x.shape[-1]:
        raise ValueError(f"dct_crop: pseudo-input side d = {scale.shape[-1]} exceeds image side D = {x.shape[-1]}")


def _check_idct_args(u: torch.Tensor, scale: torch.Tensor, size: int) -> None:
    check_floating("idct_pad", "u", u)
    check_floating("idct_pad", "scale", scale)
    check_shape("idct_pad", "u", u, "(B, C, d, d)", ndim=4)
    check_same_device("idct_pad", u=u, scale=scale)
    if tuple(scale.shape) != tuple(u.shape[1:]):
        raise ValueError(f"idct_pad: scale must be (C, d, d) = {tuple(u.shape[1:])}, got {tuple(scale.shape)}")
    if u.shape[-1] != u.shape[-2]:
        raise ValueError(f"idct_pad: u must be square (B, C, d, d), got shape {tuple(u.shape)}")
    check_int("idct_pad", "size", size, minimum=u.shape[-1])


def dct_crop(x: torch.Tensor, scale: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Algorithm 1: (B, C, D, D) images in [-1, 1] -> (B, C, d, d) normalised low-frequency DCT.

    y = clamp(crop_d(DCT2((x + 1) / 2)) / scale, -1, 1), with scale S of shape (C, d, d) > 0.
    """
    _check_dct_args(x, scale)
    return implementation("dct_crop", choose_backend("dct_crop", backend, x.device))(x, scale)


def idct_pad(u: torch.Tensor, scale: torch.Tensor, size: int, *, backend: str = "auto") -> torch.Tensor:
    """Algorithm 2: (B, C, d, d) pseudo-input -> (B, C, size, size) image in [-1, 1].

    x = 2 clamp(IDCT2(zero_pad(u * scale)), 0, 1) - 1; differentiable with respect to u.
    """
    _check_idct_args(u, scale, size)
    return implementation("idct_pad", choose_backend("idct_pad", backend, u.device))(u, scale, int(size))


def dct_crop_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    coeffs = dct_coefficients(x, scale.shape[-1])
    return (coeffs / scale.float()).clamp(-1.0, 1.0).to(x.dtype)


def idct_pad_torch(u: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    basis = dct_basis(u.shape[-1], size, device=u.device)
    image01 = basis.T @ (u.float() * scale.float()) @ basis
    return (2.0 * image01.clamp(0.0, 1.0) - 1.0).to(u.dtype)


def dct_coefficients(x: torch.Tensor, d: int) -> torch.Tensor:
    """Unnormalised cropped DCT A_d ((x + 1) / 2) A_d^T of (B, C, D, D) images in [-1, 1]."""
    basis = dct_basis(d, x.shape[-1], device=x.device)
    return basis @ ((x.float() + 1.0) * 0.5) @ basis.T


def dct_scale_bound(channels: int, d: int, size: int) -> torch.Tensor:
    """A data-independent S: the largest |coefficient| any image in [0, 1] can have.

    For a coefficient with weights w = A_k (x) A_l, the extremes over x in [0, 1]^(D x D)
    are the sums of the positive and of the negative weights. Dividing by this bound
    keeps y in [-1, 1] before any data has been seen.
    """
    basis = dct_basis(d, size, dtype=torch.float64)
    weights = basis[:, None, :, None] * basis[None, :, None, :]  # (d, d, D, D)
    pos = weights.clamp(min=0).sum((-2, -1))
    neg = (-weights).clamp(min=0).sum((-2, -1))
    bound = torch.maximum(pos, neg).float()
    return bound.expand(channels, d, d).clone()
