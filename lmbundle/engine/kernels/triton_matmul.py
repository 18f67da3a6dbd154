"""int8 matmuls of prompt chunks (many rows of x): tensor-core tiles that expand the int8 weights as they
read them, or, for long chunks, one dense copy of the weight and cuBLAS.

A decode step reads each weight once for one row (`triton_gemv.py`). A prompt chunk reads it once for S
rows: at 128 tokens that is still mostly bytes (the 2B's 1.8 GB of int8 weights take ~0.5 ms at the H200's
bandwidth; its FLOPs ~0.5 ms on the tensor cores), so expanding the weights to a bf16 copy first (1 byte
read, 2 written, 2 read again by cuBLAS) costs more than the matmul. `int8_matmul` expands each
[BLOCK_N, BLOCK_K] tile in registers instead: the same values as the reference's dequantization
(q * scale rounded once to x's dtype), then `tl.dot`. The expansion is repeated for every block of rows,
so past `EXPAND_ONCE_ROWS` rows the dense copy + cuBLAS wins and `dequantize` makes it.

Imported only where Triton is installed (`triton_ops.py` is its user).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lmbundle.models.linear import BLOCK

_GROUP = tl.constexpr(BLOCK)
EXPAND_ONCE_ROWS = 0  # longer chunks: dense copy + cuBLAS (H200 sweep, `benchmarks/bench_int8_gemv.py --chunks`)


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


def pick_tiles(rows: int, out_features: int) -> Tiles:
    """Tiles for `rows` rows of x: the rows are the product's narrow side (16..128 wide), 64 features a warp
    group."""
    if rows <= 16:
        return Tiles(16, 64, 128, 4, 4)
    if rows <= 64:
        return Tiles(64, 64, 128, 4, 4)
    return Tiles(128, 128, 64, 8, 3)


@triton.jit
def _int8_matmul_kernel(x_ptr, x_stride, q_ptr, s_ptr, out_ptr, out_stride, M, N, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (block of BLOCK_N output features, block of BLOCK_M rows): out.T = W x.T with fp32 sums. The
    expanded weight tile is the product's first operand, which the tensor cores take from registers
    (the second must come from shared memory, where x's tiles are staged ahead). K is a multiple of
    BLOCK_K (the caller checks)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < M, n < N
    dtype = x_ptr.dtype.element_ty
    groups: tl.constexpr = BLOCK_K // _GROUP
    g = tl.arange(0, groups)
    x_ptrs = x_ptr + m[None, :].to(tl.int64) * x_stride + k[:, None]  # x.T tiles [BLOCK_K, BLOCK_M]
    # weight tiles [BLOCK_N, groups, 32] and their scales [BLOCK_N, groups]: one scale load a group
    q_ptrs = (q_ptr + n[:, None, None].to(tl.int64) * K + g[None, :, None] * _GROUP
              + tl.arange(0, _GROUP)[None, None, :])
    s_ptrs = s_ptr + n[:, None].to(tl.int64) * (K // _GROUP) + g[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        q = tl.load(q_ptrs + k0, mask=n_ok[:, None, None], other=0)
        s = tl.load(s_ptrs + k0 // _GROUP, mask=n_ok[:, None], other=0.0).to(dtype).to(tl.float32)
        w = (q.to(tl.float32) * s[:, :, None]).to(dtype)  # the reference's product, rounded once
        w = tl.reshape(w, [BLOCK_N, BLOCK_K])
        x_t = tl.load(x_ptrs + k0, mask=m_ok[None, :], other=0.0)
        acc = tl.dot(w, x_t, acc)
    tl.store(out_ptr + m[None, :].to(tl.int64) * out_stride + n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[None, :] & n_ok[:, None])


def takes(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """16-bit rows of x on CUDA, contiguous int8 block-32 weights."""
    return (x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and qweight.is_contiguous()
            and scales.is_contiguous() and scales.shape[1] * BLOCK == qweight.shape[1])


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [S, in] @ dequantize(qweight, scales).T -> [S, out] in x's dtype: the weight tiles expanded in
    registers (S <= EXPAND_ONCE_ROWS, in a multiple of the tiles' depth), else a dense copy for cuBLAS."""
    tiles = pick_tiles(x.shape[0], qweight.shape[0])
    if x.shape[0] > EXPAND_ONCE_ROWS or qweight.shape[1] % tiles.block_k or x.stride(1) != 1:
        return torch.nn.functional.linear(x, dequantize(qweight, scales, x.dtype))
    return expanding_matmul(x, qweight, scales, tiles)


def expanding_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """The tiles' kernel (x's rows at unit stride; in_features a multiple of tiles.block_k)."""
    rows, (out_features, in_features) = x.shape[0], qweight.shape
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, tiles.block_n), triton.cdiv(rows, tiles.block_m))
    _int8_matmul_kernel[grid](x, x.stride(0), qweight, scales, out, out.stride(0), rows, out_features, in_features,
                              BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                              num_warps=tiles.warps, num_stages=tiles.stages)
    return out


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, w_ptr, numel, BLOCK: tl.constexpr):
    """w = q * s per 32-column group, rounded once to w's dtype (the reference's bf16 product)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    q = tl.load(q_ptr + offsets, mask=ok, other=0).to(tl.float32)
    dtype = w_ptr.dtype.element_ty
    scale = tl.load(s_ptr + offsets // _GROUP, mask=ok, other=0.0).to(dtype).to(tl.float32)
    tl.store(w_ptr + offsets, (q * scale).to(dtype), mask=ok)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 block-32 weights as a dense `dtype` matrix in one pass (1 byte read, 2 written per weight;
    the reference's casts and product take three launches and about twice the traffic), for chunks of
    many tokens, whose matmuls then run on the tensor cores. Same values as `models.linear.dequantize`."""
    weight = torch.empty(qweight.shape, dtype=dtype, device=qweight.device)
    block = 4096
    _dequantize_kernel[(triton.cdiv(qweight.numel(), block),)](qweight, scales, weight, qweight.numel(), BLOCK=block,
                                                                num_warps=8)
    return weight
