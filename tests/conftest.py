"""Test-wide setup.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter;
TRITON_INTERPRET must be set before triton is first imported, hence here.
"""
import os
import re

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _version(module) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", module.__version__).groups()
    return int(major), int(minor)


def _triton_interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run the kernels here, or None (also None without triton)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _version(triton) < (3, 8) and _version(numpy) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (numpy >= 2.4 needs "
                f"triton >= 3.8): the Triton-backend cases are skipped")
    return None


# One reason for every Triton-backend case: the ones parametrized by backend are skipped with it,
# and the backend reports it as unavailable, so the tests that check availability skip (or expect
# the "not available" error) instead of failing inside the interpreter.
TRITON_INTERPRETER_PROBLEM = _triton_interpreter_problem()
if TRITON_INTERPRETER_PROBLEM:
    from dvp_fast.ops._backend import mark_unavailable

    mark_unavailable("triton", TRITON_INTERPRETER_PROBLEM)

# The full MNIST's IDX files, for the tests that read them (.ci/run sets it to ../shared/data/mnist).
MNIST_DIR = os.environ.get("DVP_MNIST_DIR", "")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _auto_device_is_the_cpu(request, monkeypatch):
    """`--device auto` (every CLI's default) means the CPU in tests: they assert what holds on a CPU
    (bit-exact resume, CPU timings). Tests of CUDA behaviour (marked `cuda`) pass --device cuda."""
    if request.node.get_closest_marker("cuda"):
        return
    import dvp_fast.cli as cli
    import dvp_fast.train_cli as train

    cli_device, train_device = cli._device, train._device
    monkeypatch.setattr(cli, "_device", lambda name: cli_device("cpu" if name == "auto" else name))
    monkeypatch.setattr(train, "_device",
                        lambda name, local_rank: train_device("cpu" if name == "auto" else name, local_rank))


def pytest_report_header(config):
    header = [f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    return header + ([f"NOTE: {TRITON_INTERPRETER_PROBLEM}"] if TRITON_INTERPRETER_PROBLEM else [])


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """The Triton cases: skipped, saying why, where the interpreter cannot run; without a GPU, `slow`
    (the interpreter runs each kernel in Python: 0.1 to 10 s a case, a sixth of the quick tier)."""
    interpreted = not torch.cuda.is_available()
    skip = pytest.mark.skip(reason=TRITON_INTERPRETER_PROBLEM) if TRITON_INTERPRETER_PROBLEM else None
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("backend") != "triton":
            continue
        if skip is not None:
            item.add_marker(skip)
        if interpreted:
            item.add_marker(pytest.mark.slow)


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
