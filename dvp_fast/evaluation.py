"""How good a trained DVP-VAE is: the validation ELBO, the importance-weighted (IWAE) likelihood and the
active units (Eq. 23-24 of the paper). `DVPVAE.nll`, `log_weights`, `active_units` and
`active_unit_masks` are thin methods over these functions.
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch

from . import data as datasets
from . import checks

if TYPE_CHECKING:
    from .model import DVPVAE


@torch.no_grad()
def evaluate(model: DVPVAE, images: torch.Tensor, batch_size: int, precision: str = "fp32") -> dict:
    """Negative ELBO (nats and bits/dim) and active units of `model` on uint8 `images` (N, C, H, W), and
    per layer (`layers`: the mean KL in nats of u, z_L, ..., z_1 and the active units of z_L, ..., z_1);
    precision "bf16" runs the forward under bf16 autocast, as training does."""
    checks.uint8_images(images, model.config, "images")
    was_training = model.training
    model.eval()
    batches = datasets.DeviceBatches(images, min(batch_size, images.shape[0]), model.device, shuffle=False,
                                     drop_last=False)
    total, kl, count = torch.zeros((), device=model.device), 0.0, 0
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for x in batches.batches(0):
        with autocast:
            out = model(x)
        total += (-out.elbo.float()).sum()
        kl = kl + out.kl.float().sum(0)
        count += x.shape[0]
    neg_elbo = total.item() / count
    masks = active_unit_masks(model, images[:5000].to(model.device).float() / 127.5 - 1.0, batch_size=batch_size)
    model.train(was_training)
    return dict(val_elbo=-neg_elbo, val_loss=neg_elbo / (model.config.pixels * math.log(2.0)),
                active_units=torch.cat(masks).double().mean().item(),
                layers=dict(kl=(kl / count).tolist(), active_units=[m.double().mean().item() for m in masks]))


# --- importance weights and the IWAE bound --------------------------------------------------------------------
@torch.no_grad()
def log_weights(model: DVPVAE, x: torch.Tensor, target: torch.Tensor, grid_steps: int | None = None) -> torch.Tensor:
    """Importance log-weights log p(x, z, u) - log q(z, u | x), one draw per row, (B,).

    -log r_hat(u) is the diffusion bound averaged over a grid of `grid_steps` times
    (default: config.diffusion_eval_steps), all grid points in one UNet call.
    """
    checks.model_input(model, x)
    checks.likelihood_target(model, target, x)
    if grid_steps is not None:
        checks.positive_int("grid_steps", grid_steps)
    y = model.pseudo.mean(x) if model.pseudo is not None else None
    return _draw_log_weights(model, model.encoder(model._encoder_input(x)), y, target, grid_steps)


def _draw_log_weights(model: DVPVAE, feats: list[torch.Tensor], y: torch.Tensor | None, target: torch.Tensor,
                      grid_steps: int | None = None) -> torch.Tensor:
    """One draw of (u, z) per row from the encoder's features `feats` and the DCT means `y`."""
    log_w = 0.0
    cond = None
    if model.pseudo is not None:
        u, eps = model.pseudo.sample(y)
        grid = grid_steps or model.config.diffusion_eval_steps
        log_r, neg_log_prior = model._u_term(u, eps, grid_steps=grid, entropy="sample")
        log_w = -neg_log_prior - log_r
        cond = model._condition_pyramid(u)
    td = model._top_down(feats, cond, log_ratio=True)
    return log_w + td.log_ratio.sum(1) + model.log_likelihood(target, model.likelihood_params(td.z))


@torch.no_grad()
def iwae_nll(model: DVPVAE, x: torch.Tensor, num_samples: int = 1000, max_rows: int = 4096,
             progress=None) -> torch.Tensor:
    """Importance-weighted (IWAE) estimate of -log p(x), (B,) nats.

    Each image is binarised once (Bernoulli) and encoded once (the encoder and f(x) are
    deterministic); `num_samples` draws of (u, z) are then processed in chunks of at most
    `max_rows` rows, with a streaming logsumexp on the device. `progress(rows)`, if given,
    is called after each chunk with the number of (image, draw) rows it held.
    Cost: 8 to 25 ms per row on two CPU cores for the mnist preset (as the README says), so
    1000 draws of 64 images take 9 to 27 minutes there; `bench/` measures it per device.
    """
    checks.model_input(model, x)
    num_samples = checks.positive_int("num_samples", num_samples)
    max_rows = checks.positive_int("max_rows", max_rows)
    batch = x.shape[0]
    target = model.likelihood_target(x)
    feats = model.encoder(model._encoder_input(x))
    y = model.pseudo.mean(x) if model.pseudo is not None else None
    per_chunk = max(1, int(max_rows) // batch)
    running = torch.full((batch,), -math.inf, device=x.device)
    for start in range(0, num_samples, per_chunk):
        k = min(per_chunk, num_samples - start)
        rep = lambda t: None if t is None else t.repeat_interleave(k, dim=0)  # rows b*k..b*k+k-1: image b
        log_w = _draw_log_weights(model, [rep(f) for f in feats], rep(y), rep(target)).view(batch, k)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=1))
        if progress is not None:
            progress(batch * k)
    return -(running - math.log(num_samples))


# --- active units ------------------------------------------------------------------------------------------------
@torch.no_grad()
def active_unit_masks(model: DVPVAE, x: torch.Tensor, threshold: float = 0.01,
                      batch_size: int = 500) -> list[torch.Tensor]:
    """Which latent units are active: one boolean tensor per latent layer (z_L first), flattened.

    A_u = Cov_x(E_q[z_u]) > delta (Eq. 23-24), with the variance taken over the whole of x
    (not per batch), each posterior mean given one draw of the layers above.
    """
    checks.model_input(model, x)
    batch_size = checks.positive_int("batch_size", batch_size)
    if not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    sums = squares = None
    count = 0
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        cond = None
        if model.pseudo is not None:
            cond = model._condition_pyramid(model.pseudo.sample(model.pseudo.mean(chunk))[0])
        mus = model._top_down(model.encoder(model._encoder_input(chunk)), cond).mu_q
        flat = [m.double().flatten(1) for m in mus]
        s = [f.sum(0) for f in flat]
        q = [f.pow(2).sum(0) for f in flat]
        sums = s if sums is None else [a + b for a, b in zip(sums, s)]
        squares = q if squares is None else [a + b for a, b in zip(squares, q)]
        count += chunk.shape[0]
    variances = [sq / count - (sm / count) ** 2 for sm, sq in zip(sums, squares)]
    return [(v > threshold) for v in variances]


def active_units(model: DVPVAE, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 500,
                 per_layer: bool = False):
    """Fraction of latent units z_1..z_L whose posterior mean varies over x by more than `threshold`:
    a float, or a list of per-layer fractions (z_L first) with per_layer=True."""
    masks = active_unit_masks(model, x, threshold, batch_size)
    if per_layer:
        return [m.double().mean().item() for m in masks]
    return torch.cat(masks).double().mean().item()
