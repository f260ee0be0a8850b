"""The one dispatch point: what "auto" picks, explicit requests, and `use_backend`."""
import pytest
import torch

from dvp_fast import ops
from dvp_fast.ops._backend import choose_backend


def test_use_backend_overrides_auto_only_inside_the_block():
    cpu = torch.device("cpu")
    default = choose_backend("dct_crop", "auto", cpu)
    assert default == ("cpp" if ops.backend_available("cpp") else "torch")
    with ops.use_backend("torch"):
        assert choose_backend("dct_crop", "auto", cpu) == "torch"
        with ops.use_backend("auto"):
            assert choose_backend("dct_crop", "auto", cpu) == default
        assert choose_backend("dct_crop", "auto", cpu) == "torch"
    assert choose_backend("dct_crop", "auto", cpu) == default


def test_use_backend_rejects_unknown_names_and_applies_explicit_checks():
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("cuda"):
            pass
    cpu = torch.device("cpu")
    with ops.use_backend("triton"):
        if not ops.backend_available("triton"):
            with pytest.raises(RuntimeError, match="backend='triton' is not available"):
                choose_backend("dct_crop", "auto", cpu)
        elif ops._backend.triton_interpreting():  # the interpreter runs Triton on CPU tensors
            assert choose_backend("dct_crop", "auto", cpu) == "triton"
        else:
            with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
                choose_backend("dct_crop", "auto", cpu)


def test_the_model_on_the_reference_path_matches_auto():
    from dvp_fast import DVPVAE

    model = DVPVAE.from_preset("mnist")
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    torch.manual_seed(3)
    auto = model(x).elbo
    torch.manual_seed(3)
    with ops.use_backend("torch"):
        reference = model(x).elbo
    torch.testing.assert_close(auto, reference, rtol=1e-4, atol=1e-2)


def test_the_models_gradients_on_auto_match_the_reference_path():
    """With cpp built, auto runs the fused conv1x1 (SiLU inside, recomputed in backward) and the other
    fused ops; every parameter's gradient must match the pure-PyTorch path."""
    from dvp_fast import DVPVAE
    from helpers import SMALL

    model = DVPVAE.from_preset("mnist", **SMALL)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    grads = {}
    for backend in ("auto", "torch"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with ops.use_backend(backend):
            model(x).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["auto"].keys() == grads["torch"].keys()
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["auto"][name], g, rtol=1e-3, atol=1e-4 * (g.abs().max().item() + 1e-3),
                                   msg=lambda m: f"{name}: {m}")
