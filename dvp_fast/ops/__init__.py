"""Differentiable hot-path ops of DVP-VAE, each with a `backend` argument.

One module per op: `<op>.py` holds the public function, its argument checks and the pure-PyTorch
fallback; `<op>_triton.py` the Triton launches and autograd; `<op>_cpp.py` the C++ operators' fakes,
autograd and wrapper. Shared: `triton_launch`, `cpp_launch`, `cpp_build` (the C++ build, run on first
use) and `_backend`, the registry that lists which module implements which op and chooses a backend
per call (see it for what the backends are and how "auto" chooses).
"""
from ._backend import BACKENDS, backend_available, use_backend
from .conv1x1 import conv1x1
from .dct import dct_basis, dct_crop, idct_pad
from .dml import dml_log_prob, dml_sample
from .gaussian_kl import gaussian_log_prob, gaussian_sample_kl, gaussian_sample_kl_grouped

__all__ = [
    "BACKENDS", "backend_available", "use_backend", "conv1x1", "dct_basis", "dct_crop", "idct_pad", "dml_log_prob",
    "dml_sample", "gaussian_log_prob", "gaussian_sample_kl", "gaussian_sample_kl_grouped",
]
