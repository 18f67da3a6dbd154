"""Device kernels of the PyTorch backend; each module dispatches to a pure-torch reference off-device."""

from lmbundle.engine.kernels.int8_gemv import int8_matmul, int8_swiglu

__all__ = ["int8_matmul", "int8_swiglu"]
