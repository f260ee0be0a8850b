"""The u-samplers and the temperature of the generative path, against oracles that share no code with dvp_fast.

The UNet of the diffusion prior is replaced by the exact eps-predictor of data whose law is
known in closed form, so a correct sampler must return that law:
  * Gaussian data N(mu, s^2) per dimension:
    E[x | z_t] = mu + alpha_t s^2 (z_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2).
    Every sampler step is then affine in z_t plus Gaussian noise, so the exact mean and variance
    of the T-step output follow from a float64 recursion written here from the VDM formulas;
    as T grows they tend to (mu, s^2 + e^gamma_min), the residual variance of u = z_0 / alpha_0;
  * a two-point mixture +-a with equal weights: E[x | z_t] = a tanh(a alpha_t z_t / sigma_t^2).
The schedules are those of the three presets. The bug these tests were written against: the
ancestral sampler's sigma^2_{t|s} was multiplied by sigma_t^2 twice, which shrank 200-step samples
of N(0.3, 0.2^2) to a standard deviation of 0.007.
"""
import math

import pytest
import torch
from torch import nn

from dvp_fast import DVPVAE
from dvp_fast.config import model_preset
from dvp_fast.diffusion import DiffusionPrior
from helpers import nudged_mnist_model

PRESETS = ["mnist", "omniglot", "cifar10"]
SAMPLERS = ["ancestral", "ddim"]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _schedule(gamma_min: float, gamma_max: float, t: float) -> tuple[float, float]:
    """(alpha_t^2, sigma_t^2) of the variance-preserving linear-gamma schedule, float64."""
    g = gamma_min + (gamma_max - gamma_min) * t
    return _sigmoid(-g), _sigmoid(g)


class GaussianEpsilon(nn.Module):
    """The exact eps-predictor of data N(mu, s^2): eps_hat = (z - alpha E[x | z]) / sigma."""

    def __init__(self, gamma_min: float, gamma_max: float, mu: float, sd: float):
        super().__init__()
        self.gamma, self.mu, self.var = (gamma_min, gamma_max), mu, sd * sd

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = (self.gamma[0] + (self.gamma[1] - self.gamma[0]) * t.double())[:, None, None, None]
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        a, z = a2.sqrt(), z.double()
        x_hat = self.mu + a * self.var * (z - a * self.mu) / (a2 * self.var + s2)
        return ((z - a * x_hat) / s2.sqrt()).float()


class TwoPointEpsilon(nn.Module):
    """The exact eps-predictor of data +-a with equal weights: E[x | z] = a tanh(a alpha z / sigma^2)."""

    def __init__(self, gamma_min: float, gamma_max: float, a: float):
        super().__init__()
        self.gamma, self.a = (gamma_min, gamma_max), a

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = (self.gamma[0] + (self.gamma[1] - self.gamma[0]) * t.double())[:, None, None, None]
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        alpha, z = a2.sqrt(), z.double()
        x_hat = self.a * torch.tanh(self.a * alpha * z / s2)
        return ((z - alpha * x_hat) / s2.sqrt()).float()


def _prior(preset: str, epsilon: nn.Module | None = None) -> DiffusionPrior:
    cfg = model_preset(preset)
    prior = DiffusionPrior(cfg.image_channels, cfg.pseudoinput_size, 16, 1, 0.0, 16, cfg.gamma_min, cfg.gamma_max)
    if epsilon is not None:
        prior.unet = epsilon
    return prior


def _step_coefficients(steps: int, gamma_min: float, gamma_max: float, sampler: str, times=None):
    """Per step i = T..1: (alpha_t, sigma_t^2, coefficient of z_t, of x_hat, variance of the noise), from
    VDM's q(z_s | z_t, x) (ancestral) or the DDIM update z_s = alpha_s x_hat + sigma_s eps_hat; t, s = i/T,
    (i-1)/T, or consecutive points of `times`."""
    rows = []
    times = [i / steps for i in range(steps, -1, -1)] if times is None else times
    for t, s in zip(times[:-1], times[1:]):
        at2, vt = _schedule(gamma_min, gamma_max, t)
        as2, vs = _schedule(gamma_min, gamma_max, s)
        at, as_ = math.sqrt(at2), math.sqrt(as2)
        if sampler == "ancestral":
            var_ts = vt - (at2 / as2) * vs  # sigma^2_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
            rows.append((at, vt, (at / as_) * vs / vt, as_ * var_ts / vt, var_ts * vs / vt))
        else:
            # z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t
            ratio = math.sqrt(vs / vt)
            rows.append((at, vt, ratio, as_ - ratio * at, 0.0))
    return rows


def _gaussian_output_moments(steps, gamma_min, gamma_max, mu, sd, sampler, temperature=1.0):
    """Exact mean and variance of u = z_0 / alpha_0 after `steps` sampler steps on N(mu, sd^2) data.

    x_hat = mu + k (z - alpha mu) is affine in z, so z_s = A z_t + B + noise, and the moments
    propagate exactly from z_1 ~ N(0, temperature), the noise variances scaled by temperature.
    """
    m, v = 0.0, temperature
    for at, vt, cz, cx, noise_var in _step_coefficients(steps, gamma_min, gamma_max, sampler):
        k = at * sd**2 / (at * at * sd**2 + vt)
        a, b = cz + cx * k, cx * (mu - k * at * mu)
        m, v = a * m + b, a * a * v + temperature * noise_var
    alpha0_sq = _sigmoid(-gamma_min)
    return m / math.sqrt(alpha0_sq), v / alpha0_sq


# --- the oracle itself ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("gamma_min", [-6.0, -10.0])
def test_the_moment_recursion_tends_to_the_data_plus_the_residual_variance(sampler, gamma_min):
    """The test's own oracle: with many steps both samplers return N(mu, s^2 + e^gamma_min)."""
    for sd in (0.2, 0.05):
        m, v = _gaussian_output_moments(20_000, gamma_min, 7.0, 0.3, sd, sampler)
        assert abs(m - 0.3) < 2e-3
        assert v == pytest.approx(sd**2 + math.exp(gamma_min), rel=5e-3)


# --- the samplers -----------------------------------------------------------------------------------------------
def _moments(u: torch.Tensor) -> tuple[float, float]:
    u = u.double()
    return u.mean().item(), u.var().item()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 4, 25, 50, 200])
def test_gaussian_data_samples_have_the_exact_moments_of_the_discrete_sampler(preset, sampler, steps):
    """Sample mean and variance of u against the float64 recursion, within 5 standard errors."""
    cfg = model_preset(preset)
    mu, sd = 0.3, 0.2
    prior = _prior(preset, GaussianEpsilon(cfg.gamma_min, cfg.gamma_max, mu, sd))
    u = prior.sample(2000, steps, sampler=sampler, device="cpu")
    assert u.shape == (2000, cfg.image_channels, cfg.pseudoinput_size, cfg.pseudoinput_size)
    m, v = _moments(u)
    want_m, want_v = _gaussian_output_moments(steps, cfg.gamma_min, cfg.gamma_max, mu, sd, sampler)
    n = u.numel()  # elements are independent: the oracle and the noise act per element
    assert abs(m - want_m) < 5 * math.sqrt(want_v / n) + 1e-5, (m, want_m)
    assert abs(v - want_v) < 5 * want_v * math.sqrt(2 / n) + 1e-6, (v, want_v)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_many_steps_return_the_gaussian_data_with_the_residual_variance(preset, sampler):
    """1000 steps: u ~ N(mu, s^2 + e^gamma_min) within 2.5% in variance (0.6% of it is the
    sampler's own bias at 1000 steps, the rest 4 standard errors of 100,000 draws); s = 0.05
    makes the residual e^gamma_min as large as the data's own variance for gamma_min = -6."""
    cfg = model_preset(preset)
    images = 100_000 // (cfg.image_channels * cfg.pseudoinput_size**2)
    for sd in (0.2, 0.05):
        prior = _prior(preset, GaussianEpsilon(cfg.gamma_min, cfg.gamma_max, 0.3, sd))
        m, v = _moments(prior.sample(images, 1000, sampler=sampler, device="cpu"))
        target = sd**2 + math.exp(cfg.gamma_min)
        assert abs(m - 0.3) < 3e-3, m
        assert v == pytest.approx(target, rel=0.025), (v, target)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_two_point_data_is_reproduced(preset, sampler):
    """+-0.5 data: mean 0, variance a^2 + e^gamma_min, half the samples near each point."""
    cfg = model_preset(preset)
    a = 0.5
    prior = _prior(preset, TwoPointEpsilon(cfg.gamma_min, cfg.gamma_max, a))
    u = prior.sample(1000, 200, sampler=sampler, device="cpu").double()
    residual_sd = math.exp(0.5 * cfg.gamma_min)
    assert abs(u.mean().item()) < 0.01
    assert u.var().item() == pytest.approx(a * a + math.exp(cfg.gamma_min), rel=0.01)
    near = ((u.abs() - a).abs() < 4 * residual_sd + 0.02).double().mean().item()
    assert near > 0.99, near
    assert abs((u > 0).double().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_coefficient_table_matches_the_vdm_formulas(preset, sampler, steps):
    cfg = model_preset(preset)
    table = _prior(preset).sampler_coefficients(steps, sampler, torch.device("cpu")).double()
    rows = _step_coefficients(steps, cfg.gamma_min, cfg.gamma_max, sampler)
    want = torch.tensor([[(steps - k) / steps, 1 / at, math.sqrt(vt), cz, cx, math.sqrt(nv)]
                         for k, (at, vt, cz, cx, nv) in enumerate(rows)], dtype=torch.float64)
    torch.testing.assert_close(table, want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_coefficient_table_on_another_time_grid_matches_the_vdm_formulas(sampler):
    cfg, times = model_preset("mnist"), [1.0, 0.9, 0.5, 0.13, 0.0]
    table = _prior("mnist").sampler_coefficients(4, sampler, torch.device("cpu"), times=torch.tensor(times)).double()
    want = torch.tensor([[times[k], 1 / at, math.sqrt(vt), cz, cx, math.sqrt(nv)] for k, (at, vt, cz, cx, nv)
                         in enumerate(_step_coefficients(4, cfg.gamma_min, cfg.gamma_max, sampler, times))],
                        dtype=torch.float64)
    torch.testing.assert_close(table, want, rtol=2e-6, atol=1e-7)
    for bad in ([1.0, 0.5, 0.0], [1.0, 0.5, 0.6, 0.2, 0.0], [0.9, 0.7, 0.5, 0.2, 0.0]):
        with pytest.raises(ValueError, match="times must decrease from 1 to 0 in 5 points"):
            _prior("mnist").sampler_coefficients(4, sampler, torch.device("cpu"), times=torch.tensor(bad))


# --- temperature -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.7])
def test_temperature_multiplies_the_variance_of_u(sampler, temperature):
    """u's sampler at temperature tau: z_1 ~ N(0, tau) and every step's noise variance times tau, so
    Var(u) is tau times the tau = 1 value and the mean is unchanged; tau = 0 gives the mean, exactly."""
    cfg = model_preset("mnist")
    prior = _prior("mnist", GaussianEpsilon(cfg.gamma_min, cfg.gamma_max, 0.3, 0.2))
    u = prior.sample(2000, 25, temperature=temperature, sampler=sampler, device="cpu")
    want_m, want_v = _gaussian_output_moments(25, cfg.gamma_min, cfg.gamma_max, 0.3, 0.2, sampler, temperature)
    m, v = _moments(u)
    if temperature == 0:
        assert want_v == 0.0 and v == 0.0
        torch.testing.assert_close(u, torch.full_like(u, want_m), rtol=0, atol=1e-5)
        return
    assert abs(m - want_m) < 5 * math.sqrt(want_v / u.numel()) + 1e-5
    assert abs(v - want_v) < 5 * want_v * math.sqrt(2 / u.numel())


@pytest.fixture(scope="module")
def nudged_model():
    return nudged_mnist_model(0.2, latent_scales=(2, 2))


def _latents(model, u, noises, temperature):
    """z_L..z_1 of the generative pass from u with the given per-layer noises."""
    cond = model._condition_pyramid(u)
    return model._top_down_prior(cond, noises, temperature)


def test_temperature_zero_gives_the_prior_mean_at_every_layer(nudged_model):
    """z_l at tau = 0 with random noises equals z_l with no noise, layer by layer."""
    m = nudged_model
    u = torch.randn(3, 1, 7, 7) * 0.3
    noises = m._prior_noises(3)
    with torch.no_grad():
        at_zero = _latents(m, u, noises, 0.0)
        no_noise = _latents(m, u, [torch.zeros_like(e) for e in noises], 1.0)
    for a, b in zip(at_zero, no_noise):
        assert torch.equal(a, b)


@pytest.mark.parametrize("temperature", [0.25, 2.0])
def test_temperature_scales_the_variance_of_every_layer(nudged_model, temperature):
    """Noise in layer l alone: the layers above are untouched and z_l moves by sqrt(tau) sigma_l eps,
    i.e. (z_l(tau) - z_l(0)) = sqrt(tau) (z_l(1) - z_l(0)), for every l."""
    m = nudged_model
    u = torch.randn(3, 1, 7, 7) * 0.3
    zeros = [torch.zeros_like(e) for e in m._prior_noises(3)]
    with torch.no_grad():
        base = _latents(m, u, zeros, 0.0)
        for layer in range(len(zeros)):
            noises = list(zeros)
            noises[layer] = torch.randn_like(zeros[layer])
            at_tau, at_one = _latents(m, u, noises, temperature), _latents(m, u, noises, 1.0)
            for above in range(layer):
                assert torch.equal(at_tau[above], base[above])
            moved, unit = at_tau[layer] - base[layer], at_one[layer] - base[layer]
            assert unit.abs().min() > 0
            torch.testing.assert_close(moved, math.sqrt(temperature) * unit, rtol=1e-4, atol=1e-6)


def test_model_sample_passes_the_temperature_to_u_and_the_likelihood(monkeypatch):
    """model.sample(tau): u's sampler gets tau; a DML head samples with its logistic variance times tau."""
    import dvp_fast.model as model_mod

    m = DVPVAE.from_preset("cifar10", num_ch=8, latent_scales=(1, 1), enc_blocks_per_scale=1,
                           diffusion_channels=16, diffusion_res_blocks=1).eval()
    seen = {}
    sample_u, sample_dml = m.u_prior.sample, model_mod.dml_sample

    def recording_u(*args, **kwargs):
        seen["u"] = kwargs["temperature"]
        return sample_u(*args, **kwargs)

    def recording_dml(params, scale, *args, **kwargs):
        seen["dml"] = scale
        return sample_dml(params, scale, *args, **kwargs)

    monkeypatch.setattr(m.u_prior, "sample", recording_u)
    monkeypatch.setattr(model_mod, "dml_sample", recording_dml)
    m.sample(2, temperature=0.36, steps=2)
    assert seen["u"] == pytest.approx(0.36)
    assert seen["dml"] == pytest.approx(0.6)  # the logistic's scale: its variance is times 0.36
