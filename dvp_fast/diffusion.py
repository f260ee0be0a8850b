"""The diffusion prior r_hat(u) over pseudo-inputs (VDM, Kingma et al. 2021; SPEC §9).

Variance-preserving forward process with a linear, frozen negative log-SNR
gamma(t) = gamma_min + (gamma_max - gamma_min) t, alpha_t^2 = sigmoid(-gamma_t),
sigma_t^2 = sigmoid(gamma_t), and an eps-predicting UNet. `neg_log_prob` is the
continuous-time variational bound on -log r_hat(u) (nats per pseudo-input):
    L0 + L_diff + L1, summed over the P = C d^2 dimensions, with
    L0     = E[-log N(u; z_0 / alpha_0, e^gamma_min)] = 1/2 (log 2 pi + gamma_min + 1),
    L_diff = 1/2 gamma' ||eps - eps_hat(z_t, t)||^2,  z_t = alpha_t u + sigma_t eps,
    L1     = KL(q(z_1 | u) || N(0, I)) = 1/2 (alpha_1^2 u^2 + sigma_1^2 - log sigma_1^2 - 1).
gamma' = gamma_max - gamma_min in closed form (the reference differentiates the
schedule with a double-backward jvp to get this constant).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNet


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


class DiffusionPrior(nn.Module):
    def __init__(self, channels: int, size: int, model_channels: int, res_blocks: int, dropout: float,
                 groups: int, gamma_min: float, gamma_max: float):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min ({gamma_min}) must be below gamma_max ({gamma_max})")
        self.shape = (channels, size, size)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self._unet_args = (channels, model_channels, res_blocks, dropout, groups)
        self.unet = UNet(*self._unet_args)

    def new_unet(self) -> UNet:
        """A freshly initialised UNet of the prior's architecture (a distilled student's body)."""
        return UNet(*self._unet_args)

    # --- schedule -------------------------------------------------------------------------
    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t

    @property
    def gamma_slope(self) -> float:
        return self.gamma_max - self.gamma_min

    # --- likelihood bound -----------------------------------------------------------------
    def neg_log_prob(self, u: torch.Tensor, grid_steps: int | None = None) -> torch.Tensor:
        """Variational bound on -log r_hat(u) per row, (B,) nats.

        grid_steps=None draws one t ~ U(0, 1) per row (training); grid_steps=T averages
        L_diff over t_i = i / T, i = 1..T, with fresh noise per point, in one UNet call.
        """
        u = u.float()
        l0 = 0.5 * (math.log(2 * math.pi) + self.gamma_min + 1.0) * u[0].numel()
        alpha1_sq, sigma1_sq = _sigmoid(-self.gamma_max), _sigmoid(self.gamma_max)
        l1 = 0.5 * (alpha1_sq * u.pow(2) + sigma1_sq - math.log(sigma1_sq) - 1.0).flatten(1).sum(1)
        return l0 + self._diffusion_loss(u, grid_steps) + l1

    def _diffusion_loss(self, u: torch.Tensor, grid_steps: int | None) -> torch.Tensor:
        b = u.shape[0]
        if grid_steps is None:
            t = torch.rand(b, device=u.device)
            rows = u
        else:
            t = torch.arange(1, grid_steps + 1, device=u.device, dtype=torch.float32) / grid_steps
            t = t.repeat(b)  # row-major: every sample sees the whole grid
            rows = u.repeat_interleave(grid_steps, dim=0)
        eps = torch.randn_like(rows)
        g = self.gamma(t)[:, None, None, None]
        z_t = torch.sqrt(torch.sigmoid(-g)) * rows + torch.sqrt(torch.sigmoid(g)) * eps
        err = (eps - self.unet(z_t, t).float()).pow(2).flatten(1).sum(1)
        loss = 0.5 * self.gamma_slope * err
        return loss if grid_steps is None else loss.view(b, grid_steps).mean(1)

    # --- sampling ---------------------------------------------------------------------------
    SAMPLERS = ("ancestral", "ddim")

    def sampler_coefficients(self, steps: int, sampler: str, device: torch.device,
                             times: torch.Tensor | None = None) -> torch.Tensor:
        """Per-step constants, (steps, 6) float32, for step i = T..1 in order, with t = i/T, s = (i-1)/T
        (or t, s = times[k], times[k + 1] for step k, `times` a decreasing grid from 1 to 0 of steps + 1 points).

        Columns: t, 1/alpha_t, sigma_t, coefficient of z_t, coefficient of x_hat, std of z_s.
        "ancestral" draws z_s from q(z_s | z_t, x = x_hat) (VDM); "ddim" is the deterministic
        respaced update z_s = alpha_s x_hat + sigma_s eps(x_hat), usable with few steps.
        Computed in float64 once; the sampling loop only indexes rows (no host syncs).
        """
        if sampler not in self.SAMPLERS:
            raise ValueError(f"sampler must be one of {self.SAMPLERS}, got {sampler!r}")
        if times is None:
            times = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
        else:
            times = torch.as_tensor(times, dtype=torch.float64).cpu()
            if times.shape != (steps + 1,) or times[0] != 1 or times[-1] != 0 or not (times.diff() < 0).all():
                raise ValueError(f"times must decrease from 1 to 0 in {steps + 1} points, got {times.tolist()}")
        t, s = times[:-1], times[1:]
        g_t, g_s = self.gamma(t), self.gamma(s)
        alpha_t, alpha_s = torch.sigmoid(-g_t).sqrt(), torch.sigmoid(-g_s).sqrt()
        var_t, var_s = torch.sigmoid(g_t), torch.sigmoid(g_s)
        if sampler == "ancestral":
            # Variance preserving: sigma^2 = 1 - alpha^2, so sigma^2_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
            # = 1 - alpha_{t|s}^2, with alpha_{t|s}^2 = alpha_t^2 / alpha_s^2 = e^{softplus(g_s) - softplus(g_t)}.
            var_ts = -torch.expm1(F.softplus(g_s) - F.softplus(g_t))
            coef_z = (alpha_t / alpha_s) * var_s / var_t
            coef_x = alpha_s * var_ts / var_t
            std = torch.sqrt(var_ts * var_s / var_t)
        else:
            ratio = torch.sqrt(var_s / var_t)  # sigma_s / sigma_t
            coef_z, coef_x, std = ratio, alpha_s - ratio * alpha_t, torch.zeros_like(t)
        table = torch.stack([t, 1.0 / alpha_t, var_t.sqrt(), coef_z, coef_x, std], dim=1)
        return table.to(device=device, dtype=torch.float32)

    def _cached_coefficients(self, steps: int, sampler: str, device: torch.device) -> torch.Tensor:
        """The table, made once per (steps, sampler, device): a CUDA graph cannot copy from the host."""
        cache = self.__dict__.setdefault("_coefficient_cache", {})
        key = (steps, sampler, device)
        if key not in cache:
            cache[key] = self.sampler_coefficients(steps, sampler, device)
        return cache[key]

    @torch.no_grad()
    def sample(self, n: int, steps: int, temperature: float = 1.0, device: torch.device | str | None = None,
               sampler: str = "ancestral", step_fn=None, unet: nn.Module | None = None,
               predicts: str = "eps") -> torch.Tensor:
        """u ~ r_hat in `steps` steps, (n, C, d, d); `temperature` multiplies every variance.

        `step_fn` replaces `denoise_step` (a compiled version of it, say); noise is drawn here,
        outside it, so that compiled and eager sampling consume the RNG identically. `unet`
        replaces the prior's own eps-network (a distilled student's, which samples with the
        ancestral update and predicts eps or, with `predicts="x"`, x itself).
        """
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if predicts not in self.PREDICTS:
            raise ValueError(f"predicts must be one of {self.PREDICTS}, got {predicts!r}")
        device = torch.device(device) if device is not None else next(self.parameters()).device
        if step_fn is None:
            step_fn = self.denoise_step if unet is None else (
                lambda z, row, noise: self.denoise_step(z, row, noise, unet, predicts))
        noise_scale = math.sqrt(temperature)
        table = self._cached_coefficients(int(steps), sampler, device)
        was_training = self.training
        self.eval()  # no dropout while sampling
        z = noise_scale * torch.randn(n, *self.shape, device=device)
        for k in range(int(steps)):
            noise = noise_scale * torch.randn_like(z) if sampler == "ancestral" else None
            z = step_fn(z, table[k], noise)
        self.train(was_training)
        alpha0 = math.sqrt(_sigmoid(-self.gamma_min))
        return z / alpha0  # mean of p(u | z_0) = N(z_0 / alpha_0, e^gamma_min)

    PREDICTS = ("eps", "x")

    def denoise_step(self, z: torch.Tensor, row: torch.Tensor, noise: torch.Tensor | None,
                     unet: nn.Module | None = None, predicts: str = "eps",
                     straight_through: bool = False) -> torch.Tensor:
        """One sampler step z_t -> z_s given a row of `sampler_coefficients` and (scaled) noise.

        `predicts`: what the network estimates, eps (the prior's own) or x (a one-step student's:
        at t = 1, x_hat = (z - sigma eps) / alpha magnifies eps's error 1/alpha_1 = 33 times for
        the mnist schedule). `straight_through` passes the gradient of x_hat through its clamp to
        [-1, 1] unchanged (for distillation, where a saturated x_hat must still learn).
        """
        t, inv_alpha, sigma, coef_z, coef_x, std = row.unbind()
        out = (unet or self.unet)(z, t.expand(z.shape[0])).float()
        x_raw = out if predicts == "x" else (z - sigma * out) * inv_alpha
        x_hat = x_raw.clamp(-1.0, 1.0)
        if straight_through:
            x_hat = x_raw + (x_hat - x_raw).detach()
        z_s = coef_z * z + coef_x * x_hat
        return z_s if noise is None else z_s + std * noise
