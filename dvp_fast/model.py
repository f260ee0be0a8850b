"""DVP-VAE: a top-down hierarchical VAE with a diffusion-based VampPrior (Kuzina & Tomczak, 2024).

Figure 2 of the paper, as code:
  x --Encoder--> h_s (one feature map per latent scale)
  x --f_dct--> y;  u ~ r(u|x) = N(y, e^lv);  u_img = f_dct^dagger(u), pooled once per scale
  state s = ones; for l = L..1:  p(z_l | s, u_img) = PriorNet([s, pool(u_img)]) -> mu_p, lv_p, h
                                 q(z_l | s, h_s)   = PosteriorNet((h_s + s) / sqrt 2)
                                 s = Up(ResNet(s + h + z_up(z_l)))
  a = sum_l Up(z_l) / sqrt(L)  (latent aggregation, Eq. 18);  p(x | z) = NN(a)
  -ELBO = -log p(x|z) + sum_l KL_l + [ log r(u|x) - log r_hat(u) ]   with r_hat the diffusion prior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checks, evaluation
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .config import DVPConfig, model_preset
from .diffusion import DiffusionPrior
from .layers import DecoderResBlock, Encoder, conv1x1, conv3x3, scaled_init_factor
from .ops import dml_log_prob, dml_sample, gaussian_log_prob, gaussian_sample_kl
from .priors import MoGPrior, VampPseudoImages, mixture_log_prob
from .pseudoinput import PseudoInput

LN2 = math.log(2.0)


@dataclass
class DVPOutput:
    """Result of a training forward. Nats per image unless stated.

    kl columns: [u-term, z_L, ..., z_1] for DVP-VAE (L + 1 columns), [z_L, ..., z_1] without u.
    """

    loss: torch.Tensor  # scalar: mean negative ELBO in bits/dim (what training minimises)
    elbo: torch.Tensor  # (B,)
    recon: torch.Tensor  # (B,) -log p(x | z)
    kl: torch.Tensor  # (B, L + 1) or (B, L)
    params: torch.Tensor  # (B, out_ch, D, D) likelihood parameters


@dataclass
class Encoding:
    """Posterior draw for a batch: u ~ r(u|x) (None without pseudo-inputs), its mean y, z_L..z_1."""

    u: torch.Tensor | None
    u_mean: torch.Tensor | None
    z: list[torch.Tensor]


@dataclass
class _TopDown:
    z: list[torch.Tensor]  # z_L..z_1
    kl: torch.Tensor  # (B, L), analytic (single-sample for a VampPrior top layer)
    log_ratio: torch.Tensor | None  # (B, L): log p(z_l | .) - log q(z_l | .) at the sample
    mu_q: list[torch.Tensor]


class TopDownBlock(nn.Module):
    """One stochastic layer z_l: prior net, posterior net and the state update (SPEC §6)."""

    def __init__(self, cfg: DVPConfig, res: int, scale: int, cond_ch: int, last: bool,
                 upsample_to: int | None):
        super().__init__()
        ch, hid, cz, init = cfg.num_ch, cfg.hidden_ch, cfg.latent_width, scaled_init_factor(cfg.num_latents)
        self.res, self.scale, self.last, self.upsample_to = res, scale, last, upsample_to
        self.latent_width = cz
        self.logvar_range = (cfg.min_logvar, cfg.max_logvar)
        self.prior_net = DecoderResBlock(ch + cond_ch, hid, 2 * cz + ch, last_scale=0.0)
        self.posterior_net = DecoderResBlock(ch, hid, 2 * cz, last_scale=0.0)
        if not last:  # the last block's state is never read: it gets no update path at all
            self.z_up = conv1x1(cz, ch)
            with torch.no_grad():
                self.z_up.weight.mul_(init)
            self.resnet = DecoderResBlock(ch, hid, ch, last_scale=init)

    def forward(self, s: torch.Tensor, cond: torch.Tensor | None, e: torch.Tensor | None = None):
        """(mu_p, logvar_p, h, mu_q, logvar_q): the prior and, given encoder features e, the posterior
        (None, None without). The model calls blocks this way, through __call__, so that a compiled
        block (Module.compile) really runs compiled: one graph for both nets."""
        mu_p, lv_p, h = self.prior(s, cond)
        if e is None:
            return mu_p, lv_p, h, None, None
        mu_q, lv_q = self.posterior(s, e)
        return mu_p, lv_p, h, mu_q, lv_q

    def prior(self, s: torch.Tensor, cond: torch.Tensor | None):
        """(mu_p, logvar_p, h) from the state and the pooled pseudo-input image."""
        inp = s if cond is None else torch.cat([s, cond.to(s.dtype)], dim=1)
        cz = self.latent_width
        out = self.prior_net(inp)
        return out[:, :cz], out[:, cz:2 * cz].clamp(*self.logvar_range), out[:, 2 * cz:]

    def posterior(self, s: torch.Tensor, e: torch.Tensor):
        """(mu_q, logvar_q); q sees the encoder features and the state, not u."""
        out = self.posterior_net((e + s) * (1.0 / math.sqrt(2.0)))
        return out[:, :self.latent_width], out[:, self.latent_width:].clamp(*self.logvar_range)

    def update(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Next state from s (already s + h) and z."""
        s = self.resnet(s + self.z_up(z.to(s.dtype)))
        if self.upsample_to is not None:
            s = F.interpolate(s, size=(self.upsample_to, self.upsample_to), mode="bilinear", align_corners=False)
        return s


class DVPVAE(nn.Module):
    def __init__(self, config: DVPConfig):
        super().__init__()
        if not isinstance(config, DVPConfig):
            raise TypeError(f"DVPVAE expects a DVPConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.validate_inputs = True  # input range/finiteness checks cost one host sync per call
        c, size = cfg.image_channels, cfg.image_size
        self.resolutions = cfg.scale_resolutions()  # bottom-up
        pools = [1 if (i == 0 and cfg.start_scale_at_x) else 2 for i in range(len(self.resolutions))]
        self.encoder = Encoder(c, cfg.num_ch, cfg.hidden_ch, cfg.enc_blocks_per_scale, pools)

        cond_ch = c if cfg.pseudoinputs else 0
        self.blocks = nn.ModuleList()
        top_down_scales = list(reversed(range(len(cfg.latent_scales))))
        for i in top_down_scales:
            for j in range(cfg.latent_scales[i]):
                last_of_scale = j == cfg.latent_scales[i] - 1
                self.blocks.append(TopDownBlock(
                    cfg, self.resolutions[i], i, cond_ch, last=(i == 0 and last_of_scale),
                    upsample_to=self.resolutions[i - 1] if (last_of_scale and i > 0) else None))

        self.z_to_features = conv1x1(cfg.latent_width, cfg.num_ch)
        out_ch = c if cfg.likelihood == "bernoulli" else cfg.num_mix * (3 * c + 1)
        self.likelihood_head = conv3x3(cfg.num_ch, out_ch)

        self.pseudo: PseudoInput | None = PseudoInput(cfg) if cfg.pseudoinputs else None
        self.u_prior: nn.Module | None = None
        self.vamp: VampPseudoImages | None = None
        if cfg.pseudoinputs and cfg.prior == "diffusion":
            self.u_prior = DiffusionPrior(c, cfg.pseudoinput_size, cfg.diffusion_channels, cfg.diffusion_res_blocks,
                                          cfg.diffusion_dropout, cfg.diffusion_groups, cfg.gamma_min, cfg.gamma_max)
        elif cfg.pseudoinputs and cfg.prior == "mog":
            self.u_prior = MoGPrior(self.pseudo.shape, cfg.mog_components)
        elif cfg.prior == "vampprior":
            self.vamp = VampPseudoImages(cfg.num_pseudoinputs, (c, size, size))
        # Distilled few-step samplers for u (dvp_fast.distill): sampling only, frozen, never in the ELBO.
        self.u_students = nn.ModuleDict()
        for k in cfg.distilled_steps:
            self.add_student(k, self.u_prior.new_unet(), self.student_predicts(k))

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DVPVAE":
        """The model of a dataset preset ("mnist", "omniglot", "cifar10"), with DVPConfig overrides."""
        return cls(model_preset(name, **overrides))

    @classmethod
    def from_checkpoint(cls, path_or_dir: str, ema: bool = True, map_location="cpu") -> "DVPVAE":
        """Load a model saved by dvp-train: a .pt file, or a run folder (its best.pt, else last.pt).

        ema=True (default) loads the exponential moving average of the weights, which is what
        the paper evaluates; ema=False the raw training weights.
        """
        path = resolve_checkpoint(path_or_dir)
        model = cls.from_checkpoint_payload(load_checkpoint(path, map_location), path, ema)
        return model.to(map_location) if not isinstance(map_location, dict) else model

    @classmethod
    def from_checkpoint_payload(cls, payload: dict, path: str, ema: bool = True) -> "DVPVAE":
        """The model of a checkpoint already read with `load_checkpoint(path)` (for callers that also
        need its other entries: the file is then read and verified once)."""
        try:
            config = DVPConfig.from_dict(payload["model_config"])
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: its model_config is not valid here: {exc}") from exc
        key = "ema" if ema and "ema" in payload else "model"
        if key not in payload:
            raise CheckpointError(f"{path}: holds no model weights (no 'model' entry)")
        model = cls(config)
        try:
            model.load_state_dict(payload[key])
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path}: weights do not fit the stored configuration: {exc}") from exc
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str, map_location="cpu", revision: str | None = None) -> "DVPVAE":
        """Load shareable weights: a folder with model.safetensors and config.json, or a Hub repo id.

        Nothing is unpickled, so a folder from anyone runs none of their code. A repo id
        ("owner/name") needs huggingface_hub (pip install "dvp_fast[hub]") and a network the
        first time; a local folder needs neither.
        """
        from .pretrained import load_pretrained

        return load_pretrained(cls, name_or_path, map_location=map_location, revision=revision)

    def save_pretrained(self, folder: str, metadata: dict | None = None) -> list[str]:
        """Write model.safetensors and config.json into `folder` (the Hub's layout); returns the paths.

        These are this module's weights as they are: to share a run's EMA weights, load them
        with `from_checkpoint(run, ema=True)` first, or use `dvp-export`.
        """
        from .pretrained import save_pretrained

        return save_pretrained(self, folder, metadata)

    # --- distilled few-step samplers -----------------------------------------------------------------
    def add_student(self, steps: int, unet: nn.Module, predicts: str = "eps") -> None:
        """Register `unet` as the distilled network of the `steps`-step sampler (frozen), predicting
        eps or x, and record it in config.distilled_steps (and distilled_x_prediction), so that
        checkpoints and pretrained folders rebuild it."""
        import dataclasses

        steps = checks.positive_int("steps", steps)
        if not isinstance(self.u_prior, DiffusionPrior):
            raise ValueError("only a model with the diffusion prior over pseudo-inputs has students")
        if predicts not in DiffusionPrior.PREDICTS:
            raise ValueError(f"predicts must be one of {DiffusionPrior.PREDICTS}, got {predicts!r}")
        for p in unet.parameters():
            p.requires_grad_(False)
        self.u_students[str(steps)] = unet.to(self.likelihood_head.weight.device)  # replaces one for `steps`
        x_steps = set(self.config.distilled_x_prediction) - {steps} | ({steps} if predicts == "x" else set())
        kept = tuple(k for k in self.config.distilled_steps if k != steps)
        self.config = dataclasses.replace(self.config, distilled_steps=(*kept, steps),
                                          distilled_x_prediction=tuple(sorted(x_steps)))

    def student_predicts(self, steps: int) -> str:
        """What the `steps`-step student's network estimates: "eps" or "x"."""
        return "x" if steps in self.config.distilled_x_prediction else "eps"

    def sampler_for(self, steps: int | None = None, sampler: str | None = None) -> str:
        """The sampler `sample(steps=..., sampler=...)` uses: "student" (the distilled `steps`-step one)
        when sampler is None and a student for `steps` exists, else "ancestral"; explicit names as given."""
        steps = self.config.sample_steps if steps is None else steps
        if sampler is None:
            return "student" if str(steps) in self.u_students else "ancestral"
        if sampler == "student" and str(steps) not in self.u_students:
            have = sorted(int(k) for k in self.u_students)
            raise ValueError(f"no distilled student for {steps} steps (this model has students for {have or 'none'};"
                             f" dvp-distill makes them)")
        if sampler not in (*DiffusionPrior.SAMPLERS, "student"):
            raise ValueError(f"sampler must be one of {(*DiffusionPrior.SAMPLERS, 'student')} or None, "
                             f"got {sampler!r}")
        return sampler

    @property
    def num_latents(self) -> int:
        return self.config.num_latents

    @torch.no_grad()
    def project_parameters_(self) -> None:
        """Put range-constrained parameters back into range (call after each optimiser step).

        Today that is r(u|x)'s log-variance, clamped to [pseudoinput_logvar_min, _max] as the
        reference does; the forward pass already uses the clamped value either way.
        """
        if self.pseudo is not None:
            self.pseudo.project_()

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.likelihood_head.weight.device

    def fit_pseudoinput_scale(self, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """Set the DCT normaliser S from training images (uint8 or [-1, 1] floats); returns S."""
        if self.pseudo is None:
            raise RuntimeError("this model has no pseudo-inputs (pseudoinputs=False)")
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (N, C, D, D), got {type(images).__name__}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 in [0, 255] or floating-point in [-1, 1], got dtype {images.dtype}")
        checks.positive_int("batch_size", batch_size)
        if images.is_floating_point() and images.numel():
            lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("images contain NaN or infinite values")
            if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
                raise ValueError(f"floating-point images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] "
                                 f"(pass uint8 images in [0, 255] as they are)")
        return self.pseudo.fit_scale(images, batch_size)

    # --- input handling -----------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor, name: str = "x") -> None:
        checks.model_input(self, x, name)

    def _check_target(self, target: torch.Tensor, x: torch.Tensor) -> None:
        checks.likelihood_target(self, target, x)

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.encoder_input_mean is None:
            return x
        return (x * 127.5 + 127.5 - cfg.encoder_input_mean) / cfg.encoder_input_std

    def likelihood_target(self, x: torch.Tensor) -> torch.Tensor:
        """Bernoulli: a fresh dynamic binarisation of (x + 1) / 2; DML: x itself."""
        if self.config.likelihood == "bernoulli":
            return torch.bernoulli((x.float() + 1.0) * 0.5)
        return x

    # --- pseudo-inputs --------------------------------------------------------------------------------
    def _condition_pyramid(self, u: torch.Tensor | None) -> dict[int, torch.Tensor] | None:
        """u_img = f^dagger(u) once, average-pooled once per latent resolution."""
        if u is None:
            return None
        image = self.pseudo.image(u)
        size = self.config.image_size
        return {res: (image if res == size else F.avg_pool2d(image, size // res)) for res in set(self.resolutions)}

    def _u_term(self, u: torch.Tensor, eps: torch.Tensor, grid_steps: int | None = None,
                entropy: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log r(u|x) or -H[r], -log r_hat(u)) per row."""
        entropy = entropy or self.config.entropy
        neg_h = self.pseudo.log_prob_at_sample(eps) if entropy == "sample" else self.pseudo.neg_entropy(u.shape[0])
        return neg_h, self.u_prior.neg_log_prob(u, grid_steps)

    # --- the top-down pass ----------------------------------------------------------------------------
    def _initial_state(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        r = self.resolutions[-1]
        return torch.ones(batch, self.config.num_ch, r, r, device=self.device, dtype=dtype)

    def _vamp_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-layer posteriors q(z_L | x_k) of the K pseudo-images: (mu, logvar), each (K, c_z, r, r)."""
        pseudo = self.vamp()
        e = self.encoder(self._encoder_input(pseudo))[-1]
        return self.blocks[0].posterior(self._initial_state(pseudo.shape[0], e.dtype), e)

    def _top_down(self, feats: list[torch.Tensor], cond: dict[int, torch.Tensor] | None,
                  log_ratio: bool = False) -> _TopDown:
        """Posterior pass: z_l ~ q(z_l | x, z_>l), analytic KL per layer."""
        batch = feats[0].shape[0]
        s = self._initial_state(batch, feats[0].dtype)
        vamp = self._vamp_components() if self.vamp is not None else None
        zs, kls, ratios, mus = [], [], [], []
        for idx, block in enumerate(self.blocks):
            mu_p, lv_p, h, mu_q, lv_q = block(s, None if cond is None else cond[block.res], feats[block.scale])
            if idx == 0 and vamp is not None:
                z = mu_q + torch.exp(0.5 * lv_q) * torch.randn_like(mu_q)
                ratio = mixture_log_prob(z, *vamp) - gaussian_log_prob(z, mu_q, lv_q)
                kl = -ratio  # single-sample KL: the mixture has no closed form
            else:
                z, kl = gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p)
                ratio = gaussian_log_prob(z, mu_p, lv_p) - gaussian_log_prob(z, mu_q, lv_q) if log_ratio else None
            zs.append(z)
            kls.append(kl)
            ratios.append(ratio)
            mus.append(mu_q)
            if not block.last:
                s = block.update(s + h, z)
        return _TopDown(zs, torch.stack(kls, 1), torch.stack(ratios, 1) if log_ratio else None, mus)

    def _prior_noises(self, batch: int) -> list[torch.Tensor]:
        """Standard-normal noise for every z_l (z_L first), drawn before the generative pass."""
        cz = self.config.latent_width
        return [torch.randn(batch, cz, b.res, b.res, device=self.device) for b in self.blocks]

    def _top_down_prior(self, cond: dict[int, torch.Tensor] | None, noises: list[torch.Tensor],
                        temperature: float, vamp_pick: torch.Tensor | None = None,
                        top: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Generative pass: z_l = mu_p + sqrt(temperature) sigma_p noise_l, top-down; the first
        len(top) layers (z_L, z_L-1, ...) are `top`'s tensors instead of prior draws.

        Pure given its inputs (no RNG inside), so it can be compiled or graph-captured and
        still match the eager pass draw for draw.
        """
        s = self._initial_state(noises[0].shape[0], self.likelihood_head.weight.dtype)
        scale = math.sqrt(temperature)
        top = top or []
        zs = []
        for idx, block in enumerate(self.blocks):
            mu_p, lv_p, h, _, _ = block(s, None if cond is None else cond[block.res])
            if idx < len(top):
                z = top[idx].to(mu_p.dtype)
            else:
                if idx == 0 and vamp_pick is not None:
                    mu_k, lv_k = self._vamp_components()
                    mu_p, lv_p = mu_k[vamp_pick], lv_k[vamp_pick]
                z = mu_p + scale * torch.exp(0.5 * lv_p) * noises[idx]
            zs.append(z)
            if not block.last:
                s = block.update(s + h, z)
        return zs

    def likelihood_params(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """Latent aggregation (Eq. 18): a = sum_l Up(z_l) / sqrt(L), then Conv3x3(Conv1x1(a)).

        Upsampling is linear, so latents of one scale are summed before a single upsample.
        """
        size = self.config.image_size
        per_scale: dict[int, torch.Tensor] = {}
        for block, z in zip(self.blocks, zs):
            per_scale[block.res] = per_scale[block.res] + z if block.res in per_scale else z
        agg = None
        for res, total in per_scale.items():
            up = total if res == size else F.interpolate(total, size=(size, size), mode="bilinear",
                                                         align_corners=False)
            agg = up if agg is None else agg + up
        agg = agg * (1.0 / math.sqrt(len(zs)))
        return self.likelihood_head(self.z_to_features(agg.to(self.z_to_features.weight.dtype)))

    def log_likelihood(self, target: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(target | params) per image, (B,) nats."""
        cfg = self.config
        if cfg.likelihood == "bernoulli":
            logits = params.float()
            if cfg.bernoulli_logit_clamp is not None:
                logits = logits.clamp(-cfg.bernoulli_logit_clamp, cfg.bernoulli_logit_clamp)
            bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            return -bce.flatten(1).sum(1)
        return dml_log_prob(target, params, cfg.num_mix)

    def params_to_images(self, params: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Bernoulli: the mean image; DML: an 8-bit sample whose logistic variance is times
        `temperature` (its scale times sqrt(temperature)); at 0, the most probable component's
        mean. Both in [-1, 1]."""
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(params.float()) * 2.0 - 1.0
        return dml_sample(params, math.sqrt(temperature), self.config.num_mix)

    # --- public API -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> DVPOutput:
        """Negative ELBO of x (B, C, D, D) in [-1, 1].

        `target` overrides the likelihood target (by default a fresh binarisation for Bernoulli).
        """
        self._check_images(x)
        if target is not None:
            self._check_target(target, x)
        target = self.likelihood_target(x) if target is None else target
        feats = self.encoder(self._encoder_input(x))
        kl_parts = []
        cond = None
        if self.pseudo is not None:
            u, eps = self.pseudo.sample(self.pseudo.mean(x))
            neg_h, neg_log_prior = self._u_term(u, eps)
            kl_parts.append((neg_h + neg_log_prior).unsqueeze(1))
            cond = self._condition_pyramid(u)
        td = self._top_down(feats, cond)
        kl_parts.append(td.kl)
        params = self.likelihood_params(td.z)
        recon = -self.log_likelihood(target, params)
        kl = torch.cat(kl_parts, dim=1)
        elbo = -(recon + kl.sum(1))
        loss = -elbo.mean() / (self.config.pixels * LN2)
        return DVPOutput(loss=loss, elbo=elbo, recon=recon, kl=kl, params=params)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoding:
        """A posterior draw: u ~ r(u|x) with its mean f(x), and z_L..z_1 ~ q(z | x, u)."""
        self._check_images(x)
        u = y = cond = None
        if self.pseudo is not None:
            y = self.pseudo.mean(x)
            u, _ = self.pseudo.sample(y)
            cond = self._condition_pyramid(u)
        td = self._top_down(self.encoder(self._encoder_input(x)), cond)
        return Encoding(u=u, u_mean=y, z=td.z)

    @torch.no_grad()
    def decode(self, u: torch.Tensor | None, temperature: float = 1.0, n: int | None = None,
               top: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Images (B, C, D, D) in [-1, 1] from pseudo-inputs u (B, C, d, d) through the prior ladder.

        `top`: the top latents to keep instead of drawing them, z_L first (e.g. `encode(x).z[:1]` keeps
        z_L of a posterior draw); the layers below are drawn from the prior given them, as the
        generative pass would. `top=encode(x).z` (all layers) decodes that posterior draw itself.
        """
        temperature = checks.temperature(temperature)
        if self.pseudo is not None:
            expected = self.pseudo.shape
            if not isinstance(u, torch.Tensor) or u.dim() != 4 or tuple(u.shape[1:]) != expected:
                got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
                raise ValueError(f"u must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {got}")
            if self.validate_inputs and u.numel() and not torch.isfinite(u).all():
                raise ValueError("u contains NaN or infinite values")
        elif n is None:
            raise ValueError("a model without pseudo-inputs decodes from the prior: pass u=None and n")
        else:
            n = checks.positive_int("n", n)
        batch = n if u is None else u.shape[0]
        return self._decode(u, temperature, batch, top=self._check_top(top, batch))

    def _check_top(self, top, batch) -> list[torch.Tensor] | None:
        """`decode`'s `top`: None, or a list of at most L tensors shaped like z_L, z_L-1, ... for `batch` rows."""
        if top is None:
            return None
        if not isinstance(top, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in top):
            raise TypeError(f"top must be a list of tensors z_L, z_L-1, ... (e.g. encode(x).z[:1]), "
                            f"got {type(top).__name__}")
        if len(top) > len(self.blocks):
            raise ValueError(f"top holds {len(top)} latents, the model has {len(self.blocks)} latent layers")
        cz = self.config.latent_width
        for i, (t, block) in enumerate(zip(top, self.blocks)):
            expected = (batch, cz, block.res, block.res)
            if tuple(t.shape) != expected:
                raise ValueError(f"top[{i}] (z_{len(self.blocks) - i}) must have shape {expected}, "
                                 f"got {tuple(t.shape)}")
        return [t.to(self.device) for t in top]

    def _decode(self, u: torch.Tensor | None, temperature: float, batch: int, prior_pass=None,
                top: list[torch.Tensor] | None = None) -> torch.Tensor:
        cond = None if u is None else self._condition_pyramid(u.to(self.device, torch.float32))
        pick = None
        if self.vamp is not None:
            pick = torch.randint(0, self.config.num_pseudoinputs, (batch,), device=self.device)
        noises = self._prior_noises(batch)
        if top:
            zs = self._top_down_prior(cond, noises, temperature, pick, top)
        else:
            zs = (prior_pass or self._top_down_prior)(cond, noises, temperature, pick)
        return self.params_to_images(self.likelihood_params(zs), temperature)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, steps: int | None = None, compile: bool = False,
               sampler: str | None = None) -> torch.Tensor:
        """n images (n, C, D, D) in [-1, 1]: u from its prior in `steps` steps, then the decoder.

        `temperature` multiplies the variance of every latent, u's sampler included, and of a
        DML head's logistics (0 gives the prior means all the way down, and a DML head's most
        probable component and its mean: the same images on every call). Bernoulli models
        return the mean image, DML models an 8-bit sample. `sampler="ddim"` is the
        deterministic respaced sampler for few steps; `sampler=None` (the default) uses the distilled
        student for `steps` where the model has one (dvp-distill), else "ancestral"
        (`model.sampler_for(steps)` says which). `compile=True` captures the whole sampler
        as one CUDA graph on a GPU (cached per n, steps, temperature and sampler), and uses
        torch.compile for the diffusion step and the decoder elsewhere; the first call pays
        the capture or compilation. It is meant for GPUs: on a CPU the compiled sampler is only
        about 1.2x faster after a compilation of a minute or more (bench/results/).
        """
        n = checks.positive_int("n", n)
        temperature = checks.temperature(temperature)
        steps = self.config.sample_steps if steps is None else checks.positive_int("steps", steps)
        sampler = self.sampler_for(steps, sampler)
        if compile and self.device.type == "cuda":
            from .sampling import graphed_sampler

            return graphed_sampler(self, int(n), float(temperature), steps, sampler)()
        fns = None
        if compile:
            from .sampling import compiled_functions

            fns = compiled_functions(self)
        return self._sample(int(n), float(temperature), steps, sampler, fns)

    def _sample(self, n: int, temperature: float, steps: int, sampler: str, fns: dict | None = None):
        """The sampler itself: no host syncs, so it can be captured as a CUDA graph."""
        u = None
        if self.u_prior is not None:
            u = self._sample_u(n, temperature, steps, sampler, fns["diffusion_step"] if fns else None)
        return self._decode(u, temperature, n, fns["prior_pass"] if fns else None)

    def _sample_u(self, n: int, temperature: float, steps: int, sampler: str, step_fn=None) -> torch.Tensor:
        if sampler == "student":  # the ancestral update with the student's network
            return self.u_prior.sample(n, steps=steps, temperature=temperature, device=self.device,
                                       sampler="ancestral", unet=self.u_students[str(steps)],
                                       predicts=self.student_predicts(steps))
        return self.u_prior.sample(n, steps=steps, temperature=temperature, device=self.device, sampler=sampler,
                                   step_fn=step_fn)

    @torch.no_grad()
    def sample_pseudoinputs(self, n: int, steps: int | None = None, sampler: str | None = None,
                            temperature: float = 1.0) -> torch.Tensor:
        """n pseudo-inputs u (n, C, d, d) from the diffusion prior, with the sampler `sample` would use."""
        if not isinstance(self.u_prior, DiffusionPrior):
            raise ValueError("only a model with the diffusion prior over pseudo-inputs samples them")
        steps = self.config.sample_steps if steps is None else checks.positive_int("steps", steps)
        n, temperature = checks.positive_int("n", n), checks.temperature(temperature)
        return self._sample_u(n, temperature, steps, self.sampler_for(steps, sampler))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from a posterior draw of x: the Bernoulli mean or a DML sample."""
        return self.params_to_images(self.likelihood_params(self.encode(x).z))

    # --- evaluation (dvp_fast/evaluation.py) -----------------------------------------------------------
    def log_weights(self, x: torch.Tensor, target: torch.Tensor, grid_steps: int | None = None) -> torch.Tensor:
        """Importance log-weights log p(x, z, u) - log q(z, u | x), one draw per row, (B,)
        (`dvp_fast.evaluation.log_weights`)."""
        return evaluation.log_weights(self, x, target, grid_steps)

    def nll(self, x: torch.Tensor, num_samples: int = 1000, max_rows: int = 4096, progress=None) -> torch.Tensor:
        """Importance-weighted (IWAE) estimate of -log p(x), (B,) nats, from `num_samples` draws in chunks
        of at most `max_rows` rows (`dvp_fast.evaluation.iwae_nll`)."""
        return evaluation.iwae_nll(self, x, num_samples, max_rows, progress)

    def active_units(self, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 500,
                     per_layer: bool = False):
        """Fraction of latent units whose posterior mean varies over x by more than `threshold` (Eq. 23-24):
        a float, or per layer (z_L first) with per_layer=True (`dvp_fast.evaluation.active_units`)."""
        return evaluation.active_units(self, x, threshold, batch_size, per_layer)

    def active_unit_masks(self, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 500) -> list[torch.Tensor]:
        """active_units' per-unit decisions: one boolean tensor per latent layer (z_L first), flattened."""
        return evaluation.active_unit_masks(self, x, threshold, batch_size)
