"""Typed configuration for DVP-VAE and the per-dataset presets of the paper.

`DVPConfig` describes the model, `TrainConfig` the optimisation. The presets
reproduce the authors' released configurations (SPEC §2); where the paper and
the released code disagree, the default follows the paper and the reference
behaviour is one field away (see the comments on each field).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class DVPConfig:
    """Architecture of a DVP-VAE (or of one of its baselines).

    Shapes: images are (C, D, D) with C = `image_channels`, D = `image_size`;
    the pseudo-input u is (C, d, d) with d = `pseudoinput_size`.
    """

    name: str = "custom"
    image_channels: int = 1
    image_size: int = 28
    # "bernoulli": dynamically binarised targets, logits from the decoder.
    # "dml": 8-bit discretized mixture of logistics (PixelCNN++), `num_mix` components.
    likelihood: str = "bernoulli"
    num_mix: int = 10
    # Reference clamps p to [1e-7, 1 - 1e-7]; that equals clamping the logits
    # to +-16.118. None (default) keeps the exact Bernoulli log-likelihood.
    bernoulli_logit_clamp: float | None = None
    # Affine normalisation of encoder inputs: x_enc = (127.5 x + 127.5 - mean) / std.
    encoder_input_mean: float | None = None
    encoder_input_std: float | None = None

    # --- ladder / top-down structure -----------------------------------------
    num_ch: int = 32
    block_ch_mult: float = 1.0
    enc_blocks_per_scale: int = 3
    # Number of stochastic layers per scale, bottom-up (finest scale first).
    latent_scales: tuple[int, ...] = (4, 4)
    latent_width: int = 1
    # If True the finest latent scale has the image's resolution, else half of it.
    start_scale_at_x: bool = False
    min_logvar: float = -10.0
    max_logvar: float = 1.0

    # --- pseudo-input u and its prior -----------------------------------------
    # False gives the Ladder VAE baseline (no u; paper Table 5).
    pseudoinputs: bool = True
    # "dct" (Algorithms 1 and 2) or "downsample" (bilinear down to d and back up).
    pseudoinput_type: str = "dct"
    pseudoinput_size: int = 7
    # Normaliser S: "max" = max |DCT| (paper), "floor" = max |floor(DCT)| (reference code).
    pseudoinput_scale: str = "max"
    # r(u|x) log-variance: "shared" = one learnable value (paper), "per_element"
    # = one per pseudo-input element (reference code).
    pseudoinput_logvar: str = "shared"
    pseudoinput_logvar_min: float = -12.0
    pseudoinput_logvar_max: float = -5.0
    # Entropy of r(u|x) in the ELBO: "analytic" (paper) or "sample" (single-sample
    # log r(u|x), reference code). Same expectation.
    entropy: str = "analytic"
    # Prior: "diffusion" (DVP-VAE), "mog" (mixture of Gaussians over u, ablation),
    # or "vampprior" (top-layer VampPrior with learnable pseudo-images, Table 6).
    prior: str = "diffusion"
    num_pseudoinputs: int = 500
    mog_components: int = 10

    # --- diffusion prior over u (VDM, continuous time, eps-prediction) --------
    diffusion_channels: int = 16
    diffusion_res_blocks: int = 2
    diffusion_dropout: float = 0.0
    diffusion_groups: int = 16
    gamma_min: float = -6.0
    gamma_max: float = 7.0
    # T of the Riemann sum used for the diffusion term at evaluation time.
    diffusion_eval_steps: int = 25
    # Ancestral steps of the sampler (the paper uses 50).
    sample_steps: int = 50
    # Step counts with a distilled few-step student sampler for u (dvp_fast.distill; beyond the
    # paper). Each is a UNet like the prior's, used only for sampling, never for the likelihood.
    distilled_steps: tuple[int, ...] = ()
    # Those of distilled_steps whose student predicts x rather than eps (the one-step student:
    # bench/results/distill-parameterisation-2026-12-01.md).
    distilled_x_prediction: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.latent_scales = tuple(int(n) for n in self.latent_scales)
        self.distilled_steps = tuple(sorted({int(k) for k in self.distilled_steps}))
        if any(k < 1 for k in self.distilled_steps):
            raise ValueError(f"distilled_steps must be positive step counts, got {self.distilled_steps}")
        self.distilled_x_prediction = tuple(sorted({int(k) for k in self.distilled_x_prediction}))
        if not set(self.distilled_x_prediction) <= set(self.distilled_steps):
            raise ValueError(f"distilled_x_prediction {self.distilled_x_prediction} must be among distilled_steps "
                             f"{self.distilled_steps}")
        if self.distilled_steps and not (self.pseudoinputs and self.prior == "diffusion"):
            raise ValueError("distilled_steps needs the diffusion prior over pseudo-inputs (pseudoinputs=True, "
                             f"prior='diffusion'), got pseudoinputs={self.pseudoinputs}, prior={self.prior!r}")
        _check_choice("likelihood", self.likelihood, ("bernoulli", "dml"))
        _check_choice("pseudoinput_type", self.pseudoinput_type, ("dct", "downsample"))
        _check_choice("pseudoinput_scale", self.pseudoinput_scale, ("max", "floor"))
        _check_choice("pseudoinput_logvar", self.pseudoinput_logvar, ("shared", "per_element"))
        _check_choice("entropy", self.entropy, ("analytic", "sample"))
        _check_choice("prior", self.prior, ("diffusion", "mog", "vampprior"))
        if self.likelihood == "dml" and self.image_channels != 3:
            raise ValueError(
                f"likelihood='dml' models RGB images: expected image_channels=3, got {self.image_channels}"
            )
        for key in ("image_channels", "image_size", "num_ch", "latent_width", "enc_blocks_per_scale",
                    "pseudoinput_size", "num_mix", "diffusion_channels", "diffusion_groups", "diffusion_eval_steps",
                    "sample_steps", "mog_components"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.latent_scales or min(self.latent_scales) < 1:
            raise ValueError(f"latent_scales must list >= 1 latent per scale, got {self.latent_scales}")
        if self.pseudoinput_size > self.image_size:
            raise ValueError(f"pseudoinput_size ({self.pseudoinput_size}) must not exceed image_size "
                             f"({self.image_size})")
        if self.prior == "vampprior" and self.pseudoinputs:
            raise ValueError("prior='vampprior' is the VampPrior baseline without DCT pseudo-inputs: "
                             "set pseudoinputs=False")
        if self.prior == "vampprior" and self.num_pseudoinputs < 1:
            raise ValueError(f"num_pseudoinputs must be >= 1, got {self.num_pseudoinputs}")
        for lo, hi in (("pseudoinput_logvar_min", "pseudoinput_logvar_max"), ("min_logvar", "max_logvar"),
                       ("gamma_min", "gamma_max")):
            if not getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)!r}) must be <= {hi} ({getattr(self, hi)!r})")
        if self.diffusion_channels % self.diffusion_groups:
            raise ValueError(f"diffusion_channels ({self.diffusion_channels}) must be divisible by "
                             f"diffusion_groups ({self.diffusion_groups})")
        if int(self.num_ch * self.block_ch_mult) < 1:
            raise ValueError(f"num_ch * block_ch_mult must be >= 1, got {self.num_ch * self.block_ch_mult}")
        self.scale_resolutions()  # validates that the image halves evenly

    # --- derived quantities ----------------------------------------------------
    @property
    def num_latents(self) -> int:
        """L, the number of stochastic layers z_1..z_L (u not counted)."""
        return sum(self.latent_scales)

    @property
    def hidden_ch(self) -> int:
        return int(self.num_ch * self.block_ch_mult)

    @property
    def pixels(self) -> int:
        """C * D * D, the number of dimensions bits/dim refers to."""
        return self.image_channels * self.image_size**2

    def scale_resolutions(self) -> list[int]:
        """Resolution of every latent scale, bottom-up (finest first)."""
        res, out = self.image_size, []
        for i in range(len(self.latent_scales)):
            pool = 1 if (i == 0 and self.start_scale_at_x) else 2
            if res % pool:
                raise ValueError(
                    f"image_size {self.image_size} cannot be halved {len(self.latent_scales)} times "
                    f"for latent_scales={self.latent_scales} (start_scale_at_x={self.start_scale_at_x})"
                )
            res //= pool
            out.append(res)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_scales"] = list(self.latent_scales)
        d["distilled_steps"] = list(self.distilled_steps)
        d["distilled_x_prediction"] = list(self.distilled_x_prediction)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DVPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DVPConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class TrainConfig:
    """Optimisation settings of a preset (SPEC §2)."""

    batch_size: int = 250
    eval_batch_size: int = 500
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-6
    warmup_epochs: float = 2.0
    cosine_epochs: int = 300
    eta_min: float = 1e-5
    grad_clip: float = 5.0
    ema_decay: float = 0.999
    epochs: int = 300
    patience: int = 150
    seed: int = 123

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for key in ("batch_size", "eval_batch_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("lr", "eps", "grad_clip"):
            value = getattr(self, key)
            if not 0 < value < float("inf"):
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)


_MODEL_PRESETS: dict[str, dict] = {
    "mnist": dict(
        image_channels=1, image_size=28, likelihood="bernoulli",
        num_ch=32, block_ch_mult=1.0, enc_blocks_per_scale=3, latent_scales=(4, 4), latent_width=1,
        pseudoinput_size=7, diffusion_channels=16, diffusion_res_blocks=2, diffusion_dropout=0.0,
        gamma_min=-6.0, gamma_max=7.0, diffusion_eval_steps=25,
    ),
    "omniglot": dict(
        image_channels=1, image_size=28, likelihood="bernoulli",
        num_ch=80, block_ch_mult=0.5, enc_blocks_per_scale=3, latent_scales=(4, 4), latent_width=1,
        pseudoinput_size=5, diffusion_channels=32, diffusion_res_blocks=3, diffusion_dropout=0.05,
        gamma_min=-6.0, gamma_max=7.0, diffusion_eval_steps=50,
    ),
    "cifar10": dict(
        image_channels=3, image_size=32, likelihood="dml", num_mix=10,
        encoder_input_mean=120.63838, encoder_input_std=64.16736,
        num_ch=128, block_ch_mult=0.75, enc_blocks_per_scale=4, latent_scales=(10, 8, 6, 4),
        latent_width=3, start_scale_at_x=True,
        pseudoinput_size=7, diffusion_channels=32, diffusion_res_blocks=3, diffusion_dropout=0.0,
        gamma_min=-10.0, gamma_max=7.0, diffusion_eval_steps=25,
    ),
}

_TRAIN_PRESETS: dict[str, dict] = {
    "mnist": dict(batch_size=250, eval_batch_size=500, lr=1e-2, warmup_epochs=2, cosine_epochs=300,
                  eta_min=1e-5, grad_clip=5.0, epochs=300, patience=150),
    "omniglot": dict(batch_size=250, eval_batch_size=1000, lr=1e-2, warmup_epochs=2, cosine_epochs=500,
                     eta_min=1e-4, grad_clip=2.0, epochs=500, patience=200),
    "cifar10": dict(batch_size=128, eval_batch_size=512, lr=3e-3, warmup_epochs=5, cosine_epochs=3000,
                    eta_min=1e-4, grad_clip=150.0, epochs=3000, patience=300),
}

PRESETS: tuple[str, ...] = tuple(_MODEL_PRESETS)


def _check_preset(name: str) -> None:
    if name not in _MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {list(PRESETS)}")


def model_preset(name: str, **overrides: Any) -> DVPConfig:
    """The DVPConfig of a dataset preset, with `overrides` applied."""
    _check_preset(name)
    known = {f.name for f in dataclasses.fields(DVPConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown DVPConfig fields: {sorted(unknown)}; known fields: {sorted(known)}")
    return DVPConfig(name=name, **{**_MODEL_PRESETS[name], **overrides})


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a dataset preset, with `overrides` applied."""
    _check_preset(name)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}; known fields: {sorted(known)}")
    return TrainConfig(**{**_TRAIN_PRESETS[name], **overrides})
