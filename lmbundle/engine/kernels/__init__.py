"""Device kernels of the PyTorch backend: the CUDA decode step as fused Triton kernels (`triton_ops.py`)."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_installed() -> bool:
    """Triton is importable (CUDA machines, and CPU ones that run it in its interpreter for the tests)."""
    return importlib.util.find_spec("triton") is not None
