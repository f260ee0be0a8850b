"""Shared test helpers."""
import numpy as np
import torch

# A small MNIST-shaped configuration for tests that need many steps or compilation.
SMALL = dict(num_ch=8, latent_scales=(2, 1), diffusion_channels=16, diffusion_res_blocks=1)


class NoRandomness:
    """Replace the model's random draws by fixed functions of their inputs, so that the loss of
    a batch is the mean of per-image terms that do not depend on how the batch was split."""

    def __enter__(self):
        self.saved = torch.randn_like, torch.rand, torch.bernoulli
        torch.randn_like = lambda t, **kw: torch.full_like(t, 0.3, **kw)
        torch.rand = lambda *size, device=None, **kw: torch.full(size, 0.37, device=device)
        torch.bernoulli = lambda p, *a, **kw: (p > 0.5).to(p.dtype)
        return self

    def __exit__(self, *exc):
        torch.randn_like, torch.rand, torch.bernoulli = self.saved

def nudged_mnist_model(scale: float, **overrides):
    """A small MNIST-shaped model in eval mode whose zero-initialised outputs have been nudged
    (every parameter plus scale * N(0, 1), seed 0), so the UNet and the priors depend on their inputs."""
    from dvp_fast import DVPVAE

    torch.manual_seed(0)
    model = DVPVAE.from_preset("mnist", **{**dict(num_ch=8, diffusion_channels=16, diffusion_res_blocks=1),
                                            **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# The smallest sensible configuration, for tests that run whole training processes.
TINY = dict(num_ch=4, latent_scales=(1, 1), enc_blocks_per_scale=1, diffusion_channels=8, diffusion_groups=8,
            diffusion_res_blocks=1)


# --- shared by the op tests (tests/test_<op>.py, test_cpp_backend.py, test_properties.py) ------------
ALL_BACKENDS = ["torch", "triton", "cpp"]


def device_for(backend: str) -> str:
    """Where a backend's tensors live: cpp on the CPU; triton on CUDA, or the CPU under the interpreter."""
    if backend == "cpp":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def backends_implementing(op: str) -> list[str]:
    """The backends to generate `op`'s cases for: each one with a kernel for `op`, and each one not
    available here (the `backend` fixture skips those, saying so). A backend that has no kernel for
    `op` (Triton for conv1x1) gets no case at all."""
    from dvp_fast import ops
    from dvp_fast.ops import _backend

    return [b for b in ALL_BACKENDS if not ops.backend_available(b) or _backend.implements(op, b)]


def skip_unless_implemented(backend: str, op: str) -> None:
    from dvp_fast.ops import _backend

    if not _backend.implements(op, backend):
        import pytest

        pytest.skip(f"backend {backend!r} has no implementation of {op}")


def as_float64(t) -> np.ndarray:
    return t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def assert_close(actual, expected, tol: float, what: str) -> None:
    """Same shape, every element finite (an element no kernel wrote is NaN under `nan_filled_allocations`),
    and max |actual - expected| <= tol * max |expected|."""
    a, e = as_float64(actual), as_float64(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite elements (never written?)"
    err = np.abs(a - e).max() / max(np.abs(e).max(), 1e-30)
    assert err <= tol, f"{what}: max error {err:.3g} relative to max |expected|, tolerance {tol:.3g}"
