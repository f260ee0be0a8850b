"""The DVP-VAE model on CPU: presets, shapes, gradients, bounds, learning, determinism, bad input."""
import math

import numpy as np
import pytest
import scipy.fft
import torch

import dvp_fast
import dvp_fast.data
import dvp_fast.evaluation
from dvp_fast import DVPVAE, DVPConfig

# Trainable parameters of the authors' models (SPEC §2), and ours: the paper's single
# learnable sigma of r(u|x) replaces the reference's C*d*d log-variances, and the last
# block's unused z_up conv is not created.
REFERENCE_PARAMS = {"mnist": 648_579, "omniglot": 1_298_563, "cifar10": 19_478_162}


def images(model: DVPVAE, batch: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random 8-bit images in [-1, 1] of the model's shape."""
    cfg = model.config
    pix = torch.randint(0, 256, (batch, cfg.image_channels, cfg.image_size, cfg.image_size), generator=gen)
    return pix.float() / 127.5 - 1.0


def digits(n: int = 16) -> torch.Tensor:
    return dvp_fast.data.load_embedded("train")[0][:n].float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def mnist_model():
    torch.manual_seed(1)
    return DVPVAE.from_preset("mnist")


@pytest.mark.parametrize("name", ["mnist", "omniglot", "cifar10"])
def test_parameter_counts_match_the_reference(name):
    model = DVPVAE.from_preset(name)
    count = model.num_parameters()
    assert abs(count - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.03
    # Per-element r(u|x) log-variance gives the reference's layout minus the dropped z_up conv only.
    per_element = DVPVAE.from_preset(name, pseudoinput_logvar="per_element").num_parameters()
    c_z = model.config.latent_width
    assert per_element == REFERENCE_PARAMS[name] - (c_z * model.config.num_ch + model.config.num_ch)


@pytest.mark.parametrize("name,layers", [("mnist", 8), ("omniglot", 8), ("cifar10", 28)])
def test_forward_shapes_and_finiteness(name, layers):
    model = DVPVAE.from_preset(name)
    x = images(model, 2)
    out = model(x)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.elbo.shape == (2,) and out.recon.shape == (2,)
    assert out.kl.shape == (2, layers + 1)
    assert torch.isfinite(out.elbo).all() and torch.isfinite(out.kl).all()
    # the loss is the mean negative ELBO in bits per dimension
    pixels = model.config.pixels
    assert torch.allclose(out.loss, -out.elbo.mean() / (pixels * math.log(2)), rtol=1e-5)
    assert torch.allclose(out.elbo, -(out.recon + out.kl.sum(1)), rtol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "omniglot", "cifar10"])
def test_sample_shapes_and_range(name):
    model = DVPVAE.from_preset(name)
    s = model.sample(3, steps=3)
    cfg = model.config
    assert s.shape == (3, cfg.image_channels, cfg.image_size, cfg.image_size)
    assert torch.isfinite(s).all() and s.min() >= -1 and s.max() <= 1


def _all_parameters_get_gradients(model: DVPVAE, x: torch.Tensor) -> list[str]:
    """Names of trainable parameters with no or an all-zero gradient after one SGD step.

    Zero-initialised convs block gradients to the layers before them until they have
    moved; the UNet nests two of them (its output conv and each ResBlock's), so the
    third backward pass is the first that can reach every weight.
    """
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
    return [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(pseudoinput_logvar="per_element", entropy="sample"),
    dict(pseudoinputs=False),
    dict(prior="mog"),
    dict(pseudoinputs=False, prior="vampprior", num_pseudoinputs=7),
    dict(pseudoinput_type="downsample"),
], ids=["dvp", "per-element-sample", "ladder", "mog", "vampprior", "downsample"])
def test_gradient_reaches_every_trainable_parameter(overrides):
    model = DVPVAE.from_preset("mnist", **overrides)
    assert _all_parameters_get_gradients(model, images(model, 4)) == []


def test_gradient_reaches_every_parameter_cifar10():
    model = DVPVAE.from_preset("cifar10", num_ch=16, latent_scales=(1, 1, 1, 1), diffusion_channels=16)
    assert _all_parameters_get_gradients(model, images(model, 2)) == []


def test_baselines_have_the_papers_sizes():
    ladder = DVPVAE.from_preset("mnist", pseudoinputs=False)
    assert ladder.pseudo is None and ladder.u_prior is None
    assert abs(ladder.num_parameters() - 600_673) / 600_673 < 0.03
    assert ladder(images(ladder, 2)).kl.shape == (2, 8)
    for k, size in ((500, 1.0e6), (1000, 1.4e6)):  # paper Table 6: 1.0M and 1.4M
        vamp = DVPVAE.from_preset("mnist", pseudoinputs=False, prior="vampprior", num_pseudoinputs=k)
        assert abs(vamp.num_parameters() - size) / size < 0.03
    mog = DVPVAE.from_preset("mnist", prior="mog")
    assert mog(images(mog, 2)).kl.shape == (2, 9)
    assert mog.sample(2).shape == (2, 1, 28, 28)


def test_fit_pseudoinput_scale_is_max_abs_dct(mnist_model):
    gen = torch.Generator().manual_seed(3)
    pix = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8, generator=gen)
    model = DVPVAE.from_preset("mnist")
    scale = model.fit_pseudoinput_scale(pix, batch_size=10)  # several chunks
    coeffs = scipy.fft.dctn(pix.double().numpy() / 255.0, type=2, norm="ortho", axes=(-2, -1))[..., :7, :7]
    np.testing.assert_allclose(scale.numpy(), np.abs(coeffs).max(0), rtol=1e-5, atol=1e-5)
    floor = DVPVAE.from_preset("mnist", pseudoinput_scale="floor").fit_pseudoinput_scale(pix)
    expected = np.abs(np.floor(coeffs)).max(0)
    np.testing.assert_allclose(floor.numpy(), np.where(expected > 0, expected, 1.0), rtol=1e-5, atol=1e-5)
    y = model.pseudo.mean(pix.float() / 127.5 - 1)
    assert y.abs().max() <= 1.0 and y.abs().amax(0).max() > 0.999  # the max-abs image reaches +-1


def test_default_scale_bounds_every_image():
    """Before fitting, S is the largest coefficient any image can have: y stays in [-1, 1] unclamped."""
    model = DVPVAE.from_preset("cifar10")
    extremes = torch.stack([torch.ones(3, 32, 32), -torch.ones(3, 32, 32), torch.randint(0, 2, (3, 32, 32)) * 2.0 - 1])
    coeffs = dvp_fast.ops.dct.dct_coefficients(extremes, 7)
    assert (coeffs.abs() <= model.pseudo.scale * (1 + 1e-5)).all()


@pytest.mark.slow
def test_iwae_bounds_elbo_and_tightens_with_samples(mnist_model):
    model = mnist_model
    x = digits(6)
    neg_elbo = torch.stack([-model(x).elbo for _ in range(64)]).mean(0)
    nll = {k: model.nll(x, num_samples=k, max_rows=6 * 16) for k in (1, 16, 128)}
    # The true log-likelihood bound improves with K, on average over the batch.
    assert nll[128].mean() < nll[16].mean() < nll[1].mean()
    assert nll[128].mean() <= neg_elbo.mean()
    # K = 1 is an unbiased estimate of the negative ELBO (up to Monte Carlo noise).
    single = torch.stack([model.nll(x, num_samples=1) for _ in range(32)]).mean(0)
    assert abs(single.mean() - neg_elbo.mean()) / neg_elbo.mean() < 0.05


@pytest.mark.parametrize("max_rows", [1, 7, 12, 1000])
def test_nll_streams_logsumexp_over_chunks(mnist_model, monkeypatch, max_rows):
    """Whatever the chunking, nll = -(logsumexp_k w_k - log K) over the same importance weights."""
    x = digits(3)
    table = torch.randn(3, 12, dtype=torch.float64).float() * 50 - 300
    served = {"next": 0}

    def fake_log_weights(model, feats, y, target, grid_steps=None):
        k = target.shape[0] // 3
        start = served["next"]
        served["next"] += k
        assert torch.equal(y.view(3, k, *y.shape[1:])[:, 0], mnist_model.pseudo.mean(x))  # rows b*k.. are image b
        return table[:, start:start + k].reshape(-1)

    monkeypatch.setattr(dvp_fast.evaluation, "_draw_log_weights", fake_log_weights)
    got = mnist_model.nll(x, num_samples=12, max_rows=max_rows)
    assert served["next"] == 12
    torch.testing.assert_close(got, -(torch.logsumexp(table, 1) - math.log(12)))


@pytest.mark.slow
def test_overfitting_one_batch_lowers_the_loss():
    torch.manual_seed(0)
    model = DVPVAE.from_preset("mnist")
    model.fit_pseudoinput_scale(dvp_fast.data.load_embedded("train")[0][:500])
    x = digits(16)
    opt = torch.optim.Adamax(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        out = model(x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])


def test_same_seed_same_outputs():
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        model = DVPVAE.from_preset("mnist")
        torch.manual_seed(7)
        out = model(images(model, 3, torch.Generator().manual_seed(1)))
        outs.append((out.loss, out.kl, model.sample(2, steps=4)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][2], outs[1][2])


def test_encode_decode_reconstruct(mnist_model):
    x = digits(4)
    enc = mnist_model.encode(x)
    assert enc.u.shape == (4, 1, 7, 7) and enc.u_mean.shape == (4, 1, 7, 7)
    assert [tuple(z.shape) for z in enc.z] == [(4, 1, 7, 7)] * 4 + [(4, 1, 14, 14)] * 4
    assert mnist_model.decode(enc.u, temperature=0.5).shape == (4, 1, 28, 28)
    rec = mnist_model.reconstruct(x)
    assert rec.shape == x.shape and rec.min() >= -1 and rec.max() <= 1


def test_temperature_zero_is_deterministic_given_u(mnist_model):
    u = torch.zeros(2, 1, 7, 7)
    a, b = mnist_model.decode(u, temperature=0.0), mnist_model.decode(u, temperature=0.0)
    assert torch.equal(a, b)


def test_active_units_is_a_fraction(mnist_model):
    x = digits(40)
    au = mnist_model.active_units(x, batch_size=16)
    assert 0.0 <= au <= 1.0
    assert mnist_model.active_units(x, threshold=-1.0) == 1.0
    assert mnist_model.active_units(x, threshold=1e9) == 0.0
    per_layer = mnist_model.active_units(x, per_layer=True)
    assert len(per_layer) == 8 and all(0 <= v <= 1 for v in per_layer)


@pytest.mark.parametrize("bad,error,match", [
    (lambda: torch.zeros(2, 3, 28, 28), ValueError, r"\(B, 1, 28, 28\).*got \(2, 3, 28, 28\)"),
    (lambda: torch.zeros(2, 1, 32, 32), ValueError, r"got \(2, 1, 32, 32\)"),
    (lambda: torch.zeros(2, 28, 28), ValueError, r"shape \(B, 1, 28, 28\)"),
    (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.uint8), TypeError, "floating-point.*uint8"),
    (lambda: torch.full((2, 1, 28, 28), float("nan")), ValueError, "NaN"),
    (lambda: torch.full((2, 1, 28, 28), float("inf")), ValueError, "NaN or infinite"),
    (lambda: torch.full((2, 1, 28, 28), 3.0), ValueError, r"\[-1, 1\].*3"),
    (lambda: np.zeros((2, 1, 28, 28)), TypeError, "torch.Tensor"),
])
def test_bad_input_is_rejected_clearly(mnist_model, bad, error, match):
    with pytest.raises(error, match=match):
        mnist_model(bad())
    with pytest.raises(error, match=match):
        mnist_model.nll(bad(), num_samples=2)


def test_bad_configs_are_rejected_clearly():
    with pytest.raises(ValueError, match="unknown preset 'svhn'"):
        DVPVAE.from_preset("svhn")
    with pytest.raises(ValueError, match="unknown DVPConfig fields.*'num_chanels'"):
        DVPVAE.from_preset("mnist", num_chanels=3)
    with pytest.raises(ValueError, match="pseudoinput_size \\(40\\) must not exceed image_size \\(28\\)"):
        DVPVAE.from_preset("mnist", pseudoinput_size=40)
    with pytest.raises(ValueError, match="cannot be halved"):
        DVPVAE.from_preset("mnist", latent_scales=(2, 2, 2))
    with pytest.raises(ValueError, match="likelihood"):
        DVPVAE.from_preset("mnist", likelihood="gaussian")
    with pytest.raises(TypeError, match="DVPConfig"):
        DVPVAE({"name": "mnist"})
    with pytest.raises(ValueError, match="n must be a positive integer"):
        DVPVAE.from_preset("mnist").sample(0)


def test_config_round_trips_through_a_dict():
    cfg = dvp_fast.model_preset("cifar10", num_ch=64)
    assert DVPConfig.from_dict(cfg.to_dict()) == cfg


def test_residual_blocks_keep_their_parameter_names():
    """The SiLUs fused into the 1x1 convs left Identity slots so that saved checkpoints still load."""
    from dvp_fast.layers import DecoderResBlock, EncoderResBlock

    enc = EncoderResBlock(4, 3)
    assert [k for k in enc.state_dict()] == [f"net.{i}.{p}" for i in (1, 3, 5, 7) for p in ("weight", "bias")]
    assert enc.net[1].silu_input and enc.net[7].silu_input and not isinstance(enc.net[0], torch.nn.SiLU)
    dec = DecoderResBlock(4, 3, 5)
    assert [k for k in dec.state_dict()] == ([f"net.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")]
                                             + ["skip.weight", "skip.bias"])
    assert dec.net[6].silu_input and not dec.net[0].silu_input


@pytest.mark.parametrize("logvar", ["shared", "per_element"])
def test_r_logvar_outside_its_range_still_gets_a_gradient_and_is_projected_back(logvar):
    """The reference projects r(u|x)'s log-variance into [-12, -5] (clamps the parameter itself),
    so a value that left the range keeps a gradient; a clamp inside the graph would give it none."""
    from dvp_fast.config import train_preset
    from dvp_fast.trainer import Trainer

    torch.manual_seed(0)
    model = DVPVAE.from_preset("mnist", num_ch=8, latent_scales=(1, 1), pseudoinput_logvar=logvar)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    for outside, inside in ((-20.0, -12.0), (3.0, -5.0)):
        with torch.no_grad():
            model.pseudo.logvar.fill_(outside)
        model.zero_grad()
        model(x).loss.backward()
        grad = model.pseudo.logvar.grad
        assert torch.isfinite(grad).all() and (grad != 0).all(), grad
        # The forward pass used the value in range.
        assert torch.equal(model.pseudo.clamped_logvar(), torch.full((1, 1, 7, 7), inside))
    trainer = Trainer(model, train_preset("mnist", batch_size=4), steps_per_epoch=1)
    with torch.no_grad():
        model.pseudo.logvar.fill_(-20.0)
    trainer.step(x)
    assert (model.pseudo.logvar >= -12.0).all() and (model.pseudo.logvar <= -5.0).all()
