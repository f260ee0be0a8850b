"""Packaging glue that pyproject.toml cannot express.

The Triton kernels live in the top-level ``kernels/`` folder (so a reader finds
them next to ``csrc/``) but are shipped inside the installed package as
``dvp_fast.kernels``; the C++ sources are shipped as package data so that the
native CPU ops can be built just in time on a user's machine.
"""
from setuptools import setup

setup(
    packages=["dvp_fast", "dvp_fast.data", "dvp_fast.ops", "dvp_fast.kernels", "dvp_fast.csrc"],
    package_dir={"dvp_fast": "dvp_fast", "dvp_fast.kernels": "kernels", "dvp_fast.csrc": "csrc"},
    package_data={"dvp_fast.csrc": ["*.cpp", "*.h"]},
    include_package_data=False,
)
