"""What only a GPU shows: run wherever CUDA is present, skipped cleanly otherwise.

With DVP_FAST_CUDA_TESTS_ON_CPU=1 the same tests run on the CPU (the Triton path through the
interpreter), each leaving out only what needs CUDA itself (sync detection, CUDA graphs,
compilation, memory statistics). `bench/gpu_check.sh --dry-run` runs them so, in the test
suite, so that these tests' own bugs are found before a GPU is lent.
"""
import math
import os

import pytest
import torch

from dvp_fast import DVPVAE
from dvp_fast.config import train_preset
from dvp_fast.data import DeviceBatches
from dvp_fast.ops import use_backend
from dvp_fast.trainer import Trainer, compile_blocks
from helpers import SMALL, NoRandomness

DRY = os.environ.get("DVP_FAST_CUDA_TESTS_ON_CPU") == "1"
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (CUDA or DRY), reason="needs a CUDA device (DVP_FAST_CUDA_TESTS_ON_CPU=1 runs "
                                                          "these tests on the CPU, without their CUDA-only checks)")]
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Small configurations of two presets: a Bernoulli and a DML likelihood, every op on the hot path.
CONFIGS = {"mnist": SMALL,
           "cifar10": dict(num_ch=8, latent_scales=(1, 1), enc_blocks_per_scale=1, diffusion_channels=16,
                           diffusion_res_blocks=1)}
PRIORS = {"diffusion": {}, "mog": dict(prior="mog"),
          "vampprior": dict(pseudoinputs=False, prior="vampprior", num_pseudoinputs=7)}


def cuda_only(what: str) -> None:
    if not CUDA:
        pytest.skip(f"{what} needs CUDA (dry run on the CPU)")


def make_model(preset: str, **overrides) -> DVPVAE:
    torch.manual_seed(0)  # built on the CPU, then moved: the same weights on every device
    model = DVPVAE.from_preset(preset, **{**CONFIGS[preset], **overrides})
    with torch.no_grad():  # nudge the zero-initialised outputs, so that every input matters
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.validate_inputs = False
    return model.to(DEVICE)


def images(preset: str, n: int) -> torch.Tensor:
    c, d = (3, 32) if preset == "cifar10" else (1, 28)
    return torch.rand(n, c, d, d, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2 - 1


@pytest.fixture
def fixed_noise(monkeypatch):
    """The same reparameterisation noise on every backend (the fused kernels draw their own otherwise)."""
    import dvp_fast.model as model_module

    real = model_module.gaussian_sample_kl

    def with_noise(mu_q, lv_q, mu_p, lv_p, noise=None, **kw):
        if noise is None:
            noise = torch.sin(torch.arange(mu_q.numel(), device=mu_q.device, dtype=torch.float32)).view(mu_q.shape)
        return real(mu_q, lv_q, mu_p, lv_p, noise.to(mu_q.dtype), **kw)

    monkeypatch.setattr(model_module, "gaussian_sample_kl", with_noise)


def loss_and_grads(preset: str, backend: str, mode: str) -> tuple[torch.Tensor, dict]:
    model = make_model(preset)
    x = images(preset, 6)
    if mode == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=mode == "bf16")
    with use_backend(backend), NoRandomness(), autocast:
        out = model(x)
    out.loss.backward()
    return out.elbo.detach().float(), {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["fp32", "bf16", "channels_last"])
@pytest.mark.parametrize("preset", list(CONFIGS))
def test_the_triton_path_matches_the_torch_path(preset, mode, fixed_noise):
    if DRY and mode == "bf16":
        pytest.skip("bf16 through the Triton interpreter: not on the CPU")
    elbo_t, grads_t = loss_and_grads(preset, "triton", mode)
    elbo_r, grads_r = loss_and_grads(preset, "torch", "fp32" if mode == "channels_last" else mode)
    tol = 3e-2 if mode == "bf16" else 2e-4
    torch.testing.assert_close(elbo_t, elbo_r, rtol=tol, atol=tol * 10)
    assert grads_t.keys() == grads_r.keys()
    # Relative to each tensor's scale, but no finer than 1e-4 of the largest gradient: some are
    # zero in exact arithmetic (a bias before a normalisation) and only rounding noise here.
    floor = 1e-4 * max(float(g.abs().max()) for g in grads_r.values())
    for name in grads_r:
        scale = grads_r[name].abs().max().clamp_min(floor)
        err = (grads_t[name] - grads_r[name]).abs().max() / scale
        assert err < (0.1 if mode == "bf16" else 2e-3), (name, float(err))


def test_a_training_step_makes_no_host_synchronisation():
    model = make_model("cifar10")
    trainer = Trainer(model, train_preset("cifar10", batch_size=6), steps_per_epoch=10)
    x = images("cifar10", 6)
    for _ in range(2):  # allocations, cuDNN plans and the optimiser state come first
        trainer.step(x)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step(x)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode(0)
    assert trainer.read_metrics()["skipped"] == 0


@pytest.fixture
def no_tf32():
    """TF32 off inside the test (the comparison is to fp32 rounding), restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compiled_and_graphed_steps_match_eager(cuda_graphs, no_tf32):
    cuda_only("torch.compile with inductor and CUDA graphs")
    losses = {}
    for mode in ("eager", "compiled"):
        model = make_model("cifar10")
        if mode == "compiled":
            compile_blocks(model, cuda_graphs=cuda_graphs)
        trainer = Trainer(model, train_preset("cifar10", batch_size=6), steps_per_epoch=10)
        x = images("cifar10", 6)
        with NoRandomness():
            for _ in range(3):
                trainer.step(x)
        losses[mode] = trainer.read_metrics()["loss"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3), losses


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("preset", list(CONFIGS))
def test_the_graph_sampler_for_every_preset_and_prior(preset, prior):
    """On CUDA: replays draw fresh noise, and with the diffusion prior at temperature 0 (deterministic;
    the mixture priors still draw a component) the capture equals the eager sampler. The dry run on the
    CPU checks the eager half: temperature 0 draws nothing."""
    model = make_model(preset, **PRIORS[prior]).eval()
    deterministic = prior == "diffusion"
    if deterministic:
        torch.manual_seed(1)
        eager = model.sample(8, steps=5, temperature=0.0)
        torch.manual_seed(2)
        assert torch.equal(model.sample(8, steps=5, temperature=0.0), eager), "temperature 0 must draw nothing"
        if not CUDA:
            return  # the dry run: the eager half passed
    cuda_only("CUDA graph capture")
    first = model.sample(8, steps=5, compile=True)
    second = model.sample(8, steps=5, compile=True)  # a replay
    assert first.shape == second.shape == (8, *images(preset, 1).shape[1:])
    assert torch.isfinite(first).all() and first.abs().max() <= 1.0
    assert not torch.equal(first, second), "a replay must draw fresh noise"
    if deterministic:
        torch.testing.assert_close(model.sample(8, steps=5, temperature=0.0, compile=True), eager, rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("steps,predicts", [(1, "x"), (2, "eps")])
def test_the_graph_sampler_captures_a_distilled_student(steps, predicts):
    cuda_only("CUDA graph capture")
    model = make_model("mnist").eval()
    student = DVPVAE.from_preset("mnist", **CONFIGS["mnist"]).u_prior.unet  # other weights than the teacher's
    model.add_student(steps, student, predicts)
    assert model.sampler_for(steps) == "student"
    first, second = model.sample(8, steps=steps, compile=True), model.sample(8, steps=steps, compile=True)
    assert torch.isfinite(first).all() and not torch.equal(first, second), "a replay must draw fresh noise"
    # Temperature 0 is deterministic: the capture must equal the eager student, and differ from the teacher.
    graphed = model.sample(8, steps=steps, temperature=0.0, compile=True)
    torch.testing.assert_close(graphed, model.sample(8, steps=steps, temperature=0.0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(graphed, model.sample(8, steps=steps, temperature=0.0, sampler="ancestral"))


def test_iwae_on_the_device_matches_the_cpu(monkeypatch):
    import dvp_fast.model as model_module

    model = make_model("mnist").eval()
    x = (images("mnist", 4) > 0).float() * 2 - 1  # binary: the binarisation draws nothing
    # With every draw fixed (the same constant for each of the K samples), the estimate is a
    # deterministic function of the weights: the device, chunked, must reproduce the CPU, whole.
    real = model_module.gaussian_sample_kl
    monkeypatch.setattr(model_module, "gaussian_sample_kl",
                        lambda mq, lq, mp, lp, noise=None, **kw: real(mq, lq, mp, lp, torch.full_like(mq, 0.3), **kw))
    with NoRandomness():
        on_device = model.nll(x, num_samples=64, max_rows=100)  # chunks that straddle images
        on_cpu = model.cpu().nll(x.cpu(), num_samples=64)
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=1e-4, atol=1e-3)
    monkeypatch.undo()
    # With real draws: finite, and no looser than the ELBO it improves on (by 60 to 100 nats here).
    model.to(DEVICE)
    torch.manual_seed(2)
    iwae = model.nll(x, num_samples=256, max_rows=300)
    with torch.no_grad():
        neg_elbo = torch.stack([-model(x).elbo for _ in range(8)]).mean(0)
    assert torch.isfinite(iwae).all() and (iwae < neg_elbo).all(), (iwae, neg_elbo)


def test_device_batches_on_the_device_equal_the_cpu_ones():
    data = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8)
    on_device = list(DeviceBatches(data, 5, DEVICE, seed=4).batches(1, start=1))
    on_cpu = list(DeviceBatches(data, 5, "cpu", seed=4).batches(1, start=1))
    assert len(on_device) == len(on_cpu) == 3
    for a, b in zip(on_device, on_cpu):
        assert a.device.type == DEVICE.type and torch.equal(a.cpu(), b)


# Peak memory of one training step of the full presets (batch as in the paper for mnist, 32 for
# cifar10), bounded generously until a GPU measurement sets them: the test prints what it saw.
MEMORY_BOUNDS_GIB = {"mnist": (250, 4.0), "cifar10": (32, 24.0)}


@pytest.mark.parametrize("preset", list(MEMORY_BOUNDS_GIB))
def test_peak_memory_of_a_training_step_is_bounded(preset):
    cuda_only("torch.cuda memory statistics")
    batch, bound = MEMORY_BOUNDS_GIB[preset]
    torch.manual_seed(0)
    model = DVPVAE.from_preset(preset).to(DEVICE).to(memory_format=torch.channels_last)
    model.validate_inputs = False
    trainer = Trainer(model, train_preset(preset, batch_size=batch), steps_per_epoch=10, precision="bf16")
    x = images(preset, batch).contiguous(memory_format=torch.channels_last)
    trainer.step(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.step(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak memory of a {preset} step at batch {batch}: {peak:.2f} GiB (bound {bound} GiB)")
    assert math.isfinite(peak) and peak < bound
