"""Test-wide setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before
``dsmr_kernels`` is imported anywhere, so it lives at the very top of the root conftest. Without it
the Triton kernels would need a GPU driver and CI (CPU only) could not run them.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# numpy (used by the Triton interpreter) and torch threads fight on 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
