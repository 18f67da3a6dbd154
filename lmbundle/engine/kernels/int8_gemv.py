"""int8 matmul for the PyTorch backend: a fused Triton GEMV for decode on CUDA, the reference elsewhere.

Decode reads every weight once per token, so its speed is bytes over bandwidth; the reference
(dequantize to x's dtype, then F.linear) writes and re-reads a full-width copy of each weight. The
Triton path streams int8 + scales once per row of x, for 1..4 rows (short chunks; a one-token decode
step takes the fused kernels of `step_ops.py` instead); larger M, CPU, non-32 blocks and machines
without Triton take the reference. Both are CUDA-graph safe: no host syncs,
outputs come from torch's caching allocator. Install with `set_int8_matmul(int8_matmul)`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from lmbundle.models.linear import dequantize

GROUP = 32
MAX_GEMV_ROWS = 4


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def reference_int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize(qweight, scales, x.dtype))


def gemv_applies(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """True when the fused kernel handles this call: CUDA, 1..4 rows, 32-column blocks, contiguous weights."""
    in_features = qweight.shape[1]
    return (
        x.is_cuda
        and 0 < x.numel() <= MAX_GEMV_ROWS * in_features
        and scales.shape[1] * GROUP == in_features
        and qweight.is_contiguous()
        and scales.is_contiguous()
        and triton_available()
    )


def dequantize_applies(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """True when the one-pass Triton dequantization takes a chunk's int8 matmul (CUDA, 16-bit x)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and scales.shape[1] * GROUP == qweight.shape[1]
            and qweight.is_contiguous() and scales.is_contiguous() and triton_available())


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (qweight * scales).T -> [..., out] in x's dtype: the GEMV for 1..4 rows; for chunks,
    one Triton pass dequantizes the weight and cuBLAS multiplies on the tensor cores."""
    if gemv_applies(x, qweight, scales):
        from lmbundle.engine.kernels import triton_gemv

        return triton_gemv.int8_gemv(x, qweight, scales)
    if dequantize_applies(x, qweight, scales):
        from lmbundle.engine.kernels import triton_gemv

        return F.linear(x, triton_gemv.dequantize(qweight, scales, x.dtype))
    return reference_int8_matmul(x, qweight, scales)


def int8_swiglu(x: torch.Tensor, gate_qweight: torch.Tensor, gate_scales: torch.Tensor,
                up_qweight: torch.Tensor, up_scales: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T): one fused pass on the GEMV path (rounded once), else two matmuls."""
    if gemv_applies(x, gate_qweight, gate_scales) and gemv_applies(x, up_qweight, up_scales):
        from lmbundle.engine.kernels import triton_gemv

        return triton_gemv.int8_swiglu(x, gate_qweight, gate_scales, up_qweight, up_scales)
    return F.silu(int8_matmul(x, gate_qweight, gate_scales)) * int8_matmul(x, up_qweight, up_scales)
