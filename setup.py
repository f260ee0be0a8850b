"""Packaging glue that pyproject.toml cannot express.

The Triton kernels live in the top-level ``kernels/`` folder (so a reader finds
them next to ``csrc/``) but are shipped inside the installed package as
``dvp_fast.kernels``; the C++ sources are shipped as package data so that the
native CPU ops can be built just in time on a user's machine; the embedded digits
(dvp_fast/data/mnist_5k.npz, with mnist_5k.md saying where they come from) are package data too.
"""
from setuptools import setup

setup(
    packages=["dvp_fast", "dvp_fast.data", "dvp_fast.ops", "dvp_fast.kernels", "dvp_fast.csrc"],
    package_dir={"dvp_fast": "dvp_fast", "dvp_fast.kernels": "kernels", "dvp_fast.csrc": "csrc"},
    package_data={"dvp_fast.csrc": ["*.cpp", "*.h"], "dvp_fast.data": ["mnist_5k.npz", "mnist_5k.md"]},
    include_package_data=False,
)
