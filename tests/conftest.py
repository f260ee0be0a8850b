"""Test-wide setup.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter;
TRITON_INTERPRET must be set before triton is first imported, hence here.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(params=["torch", "triton", "cpp"])
def backend(request):
    """Each op backend in turn, skipped where it is not available."""
    from dvp_fast import ops

    if not ops.backend_available(request.param):
        pytest.skip(f"backend {request.param!r} is not available here")
    return request.param


@pytest.fixture
def nan_filled_allocations():
    """Uninitialised float memory is NaN, so an output element no kernel wrote shows up as NaN."""
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
