"""The int8 kernels as torch custom ops, so a compiled decode step traces through them without graph
breaks (Inductor then fuses everything between the GEMVs) and CUDA graphs capture them as usual."""

from __future__ import annotations

import torch

from lmbundle.engine.kernels.int8_gemv import int8_matmul as _int8_matmul
from lmbundle.engine.kernels.int8_gemv import int8_swiglu as _int8_swiglu


@torch.library.custom_op("lmbundle::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _int8_matmul(x, qweight, scales)


@int8_matmul.register_fake
def _(x, qweight, scales):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("lmbundle::int8_swiglu", mutates_args=())
def int8_swiglu(x: torch.Tensor, gate_qweight: torch.Tensor, gate_scales: torch.Tensor,
                up_qweight: torch.Tensor, up_scales: torch.Tensor) -> torch.Tensor:
    return _int8_swiglu(x, gate_qweight, gate_scales, up_qweight, up_scales)


@int8_swiglu.register_fake
def _(x, gate_qweight, gate_scales, up_qweight, up_scales):
    return x.new_empty(*x.shape[:-1], gate_qweight.shape[0])
