"""Device kernels of the PyTorch backend: the CUDA decode step as fused Triton kernels (`triton_ops.py`)."""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_installed() -> bool:
    """Triton is importable (CUDA machines, and CPU ones that run it in its interpreter for the tests)."""
    return importlib.util.find_spec("triton") is not None


def whole_tiles(*dims: int) -> bool:
    """Every dim is a power of two of at least 16: what the kernels tile whole (tl.arange, tl.dot)."""
    return all(n >= 16 and n & (n - 1) == 0 for n in dims)


def interpreted() -> bool:
    """Kernels run in Triton's interpreter (the CPU tests), whose 16-bit float math is not the GPU's: its
    bf16 arithmetic and dots act on the raw bits, so kernels that multiply in 16 bits on the GPU take fp32
    there (the same values: their products are exact)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
