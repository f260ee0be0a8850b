"""Pseudo-inputs u and their posterior r(u | x) = N(u; f(x), diag(e^logvar)) (SPEC §4, §8).

f is Algorithm 1 (a normalised low-frequency DCT crop, `pseudoinput_type="dct"`)
or a bilinear downsampling (`"downsample"`); its pseudo-inverse (Algorithm 2, or
bilinear upsampling) turns u back into an image that conditions every prior.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DVPConfig
from .ops import dct_crop, idct_pad
from .ops.dct import dct_coefficients, dct_scale_bound

LOG_2PI = math.log(2.0 * math.pi)


class PseudoInput(nn.Module):
    def __init__(self, cfg: DVPConfig):
        super().__init__()
        self.kind = cfg.pseudoinput_type
        self.image_size = cfg.image_size
        self.shape = (cfg.image_channels, cfg.pseudoinput_size, cfg.pseudoinput_size)
        self.scale_variant = cfg.pseudoinput_scale
        self.logvar_range = (cfg.pseudoinput_logvar_min, cfg.pseudoinput_logvar_max)
        lv_shape = (1,) if cfg.pseudoinput_logvar == "shared" else (1, *self.shape)
        # Initialised at gamma_min so that log r(u|x) and the diffusion's L0 cancel at the start.
        init = min(max(cfg.gamma_min, self.logvar_range[0]), self.logvar_range[1])
        self.logvar = nn.Parameter(torch.full(lv_shape, float(init)))
        # Normaliser S of Algorithm 1. Until `fit_scale` sees data it holds the largest
        # magnitude any image can reach, so y stays in [-1, 1] either way.
        self.register_buffer("scale", dct_scale_bound(*self.shape[:2], cfg.image_size))
        self.register_buffer("scale_fitted", torch.tensor(False))

    # --- f and its pseudo-inverse ---------------------------------------------------------------
    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): (B, C, D, D) in [-1, 1] -> (B, C, d, d); no gradient flows into x."""
        with torch.no_grad():
            if self.kind == "dct":
                return dct_crop(x, self.scale)
            return F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)

    def image(self, u: torch.Tensor) -> torch.Tensor:
        """f^dagger(u): (B, C, d, d) -> (B, C, D, D), differentiable in u."""
        if self.kind == "dct":
            return idct_pad(u, self.scale, self.image_size)
        return F.interpolate(u, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    # --- r(u | x) ---------------------------------------------------------------------------------
    def clamped_logvar(self) -> torch.Tensor:
        """The log-variance put into range, with the gradient passed straight through.

        The reference clamps the parameter itself before each use (a projection), so a value
        that leaves [min, max] still gets a gradient; a clamp inside the graph would give it
        none and it would stay out for good. `project_` is the projection proper (dvp-train
        calls it after every optimiser step); the straight-through clamp here keeps a loop
        that never calls it both in range and trainable.
        """
        lv = self.logvar
        return (lv + (lv.clamp(*self.logvar_range) - lv).detach()).expand(1, *self.shape)

    @torch.no_grad()
    def project_(self) -> None:
        """Put the log-variance parameter back into its range, in place."""
        self.logvar.clamp_(*self.logvar_range)

    def sample(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, eps): u = mean + e^{logvar / 2} eps by reparameterisation."""
        eps = torch.randn_like(mean)
        return mean + torch.exp(0.5 * self.clamped_logvar()) * eps, eps

    def log_prob_at_sample(self, eps: torch.Tensor) -> torch.Tensor:
        """log r(u | x) at u = mean + sigma eps, (B,)."""
        elem = -0.5 * (LOG_2PI + self.clamped_logvar() + eps.pow(2))
        return elem.flatten(1).sum(1)

    def neg_entropy(self, batch: int) -> torch.Tensor:
        """-H[r(u | x)] in closed form, (batch,) (the same for every x)."""
        value = -0.5 * (LOG_2PI + 1.0 + self.clamped_logvar()).sum()
        return value.expand(batch)

    # --- the normaliser S ---------------------------------------------------------------------------
    @torch.no_grad()
    def fit_scale(self, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """Set S from training images: max |DCT| (paper) or max |floor(DCT)| (reference).

        `images` is uint8 (N, C, D, D) in [0, 255] or floating in [-1, 1]; it is processed in
        chunks of `batch_size` on the device of S. Returns the new S.
        """
        if self.kind != "dct":
            raise RuntimeError("fit_scale applies to pseudoinput_type='dct' only")
        expected = (self.shape[0], self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"fit_scale: images must be (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("fit_scale: got no images")
        d = self.shape[-1]
        running = torch.zeros(self.shape, dtype=torch.float32, device=self.scale.device)
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(self.scale.device)
            chunk = chunk.float() / 127.5 - 1.0 if chunk.dtype == torch.uint8 else chunk.float()
            coeffs = dct_coefficients(chunk, d)
            if self.scale_variant == "floor":
                coeffs = torch.floor(coeffs)
            running = torch.maximum(running, coeffs.abs().amax(0))
        # A frequency that never moves (S = 0) would divide by zero (reference bug §16.7):
        # give it S = 1, which keeps its normalised values in range.
        running = torch.where(running > 0, running, torch.ones_like(running))
        self.scale.copy_(running)
        self.scale_fitted.fill_(True)
        return self.scale.clone()
