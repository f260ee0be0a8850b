"""The samplers: eager vs compiled, the deterministic few-step sampler, temperature, CUDA graphs."""
import pytest
import torch

from dvp_fast import DVPVAE
from helpers import nudged_mnist_model


@pytest.fixture(scope="module")
def model():
    return nudged_mnist_model(0.05, latent_scales=(1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_compiled_and_eager_samples_agree(model, sampler):
    torch.manual_seed(1)
    eager = model.sample(4, steps=6, sampler=sampler)
    torch.manual_seed(1)
    compiled = model.sample(4, steps=6, sampler=sampler, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.sample(4, steps=6, sampler=sampler), eager)  # fresh draws differ


def test_ddim_is_deterministic_given_the_initial_noise(model):
    prior = model.u_prior
    torch.manual_seed(3)
    a = prior.sample(5, steps=4, sampler="ddim")
    torch.manual_seed(3)
    b = prior.sample(5, steps=4, sampler="ddim")
    assert torch.equal(a, b)
    # DDIM draws only z_1: a different seed changes it, and so the result.
    torch.manual_seed(4)
    assert not torch.equal(prior.sample(5, steps=4, sampler="ddim"), a)
    assert prior.sample(2, steps=1, sampler="ddim").shape == (2, 1, 7, 7)


def test_coefficient_tables_follow_the_schedule(model):
    prior = model.u_prior
    anc = prior.sampler_coefficients(5, "ancestral", torch.device("cpu")).double()
    ddim = prior.sampler_coefficients(5, "ddim", torch.device("cpu")).double()
    assert torch.allclose(anc[:, 0], torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    assert (anc[:, 5] > 0).all() and (ddim[:, 5] == 0).all()
    # alpha_t^2 + sigma_t^2 = 1 (variance preserving)
    assert torch.allclose(1 / anc[:, 1] ** 2 + anc[:, 2] ** 2, torch.ones(5, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.sample(2, sampler="euler")


def test_temperature_reaches_every_level(model):
    """At temperature 0 nothing random is left: u's sampler and every z_l are deterministic."""
    torch.manual_seed(5)
    a = model.sample(3, steps=4, temperature=0.0)
    torch.manual_seed(6)
    b = model.sample(3, steps=4, temperature=0.0)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    assert not torch.equal(model.sample(3, steps=4, temperature=1.0), a)


def test_temperature_zero_is_deterministic_with_the_8bit_likelihood():
    """The cifar10 head (a mixture of logistics) at temperature 0 takes each pixel's most probable
    component: two calls from different RNG states give the same images."""
    torch.manual_seed(0)
    m = DVPVAE.from_preset("cifar10", num_ch=8, latent_scales=(1, 1), enc_blocks_per_scale=1,
                           diffusion_channels=16, diffusion_res_blocks=1).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(1)
    a = m.sample(4, steps=3, temperature=0.0)
    torch.manual_seed(2)
    assert torch.equal(m.sample(4, steps=3, temperature=0.0), a)
    assert not torch.equal(m.sample(4, steps=3, temperature=1.0), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampler_matches_eager():
    torch.manual_seed(0)
    m = DVPVAE.from_preset("mnist").cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    graphed = m.sample(64, steps=10, compile=True)  # capture
    assert graphed.shape == (64, 1, 28, 28) and torch.isfinite(graphed).all()
    assert not torch.equal(m.sample(64, steps=10, compile=True), graphed)  # replays draw fresh noise
    torch.manual_seed(7)
    eager = m.sample(64, steps=10)
    torch.manual_seed(7)
    replay = m.sample(64, steps=10, compile=True)
    torch.testing.assert_close(replay, eager, rtol=1e-3, atol=1e-3)


def test_the_graph_cache_is_bounded_and_keyed_by_everything_a_capture_reads(monkeypatch):
    """No GPU needed: the capture itself is replaced by a recorder. A capture is reused only for the
    same arguments, mode, autocast state and weight addresses, and at most MAX_GRAPHS are kept."""
    from dvp_fast import sampling

    made = []
    monkeypatch.setattr(sampling, "GraphedSampler", lambda *args: made.append(args) or object())
    m = DVPVAE.from_preset("mnist", num_ch=8, diffusion_channels=16, diffusion_res_blocks=1).eval()
    first = sampling.graphed_sampler(m, 8, 1.0, 10, "ancestral")
    assert sampling.graphed_sampler(m, 8, 1.0, 10, "ancestral") is first and len(made) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sampling.graphed_sampler(m, 8, 1.0, 10, "ancestral") is not first
    buried = m.blocks[-1].prior_net  # a weight the old key (one weight's address) did not watch
    next(buried.parameters()).data = next(buried.parameters()).data.clone()
    assert sampling.graphed_sampler(m, 8, 1.0, 10, "ancestral") is not first and len(made) == 3
    for n in range(1, 10):
        sampling.graphed_sampler(m, n, 1.0, 10, "ancestral")
    assert len(m._graph_cache) == sampling.MAX_GRAPHS
