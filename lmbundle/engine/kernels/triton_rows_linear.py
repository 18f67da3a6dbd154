"""The batched step's int8 linears on CUDA: y [R, N] = x [R, K] @ W.T for the scheduler's R rows (1..64),
W int8 [N, K] with fp16 scales per group of 32 inputs (`models/linear.py`), read as int8.

With R rows one read of the weights serves R tokens, so the step is bound by the bytes of weights, and
int8 halves them against the 16-bit copies cuBLAS reads (`BatchOps`). Each program streams a block of
BLOCK_N weight rows once: the int8 tile of each 32-input group becomes x's dtype in registers and takes
its group's scale there (q * s rounded once, the values `dequantize` gives), then the tensor cores
multiply it with x's tile (fp32 sums). The weight tile is the product's first operand, which the MMA
takes from registers; x's rows are its narrow second operand (padded to a tile of 16 to 64). Triton
pipelines the int8 and x tiles through shared memory (`num_stages`); the 2-byte scales, which it does not
stage there, are loaded a loop step ahead. Compiled for sm_90 the loop takes ~5-6 thread instructions a
weight on 2-warp mma.sync tiles and ~7.5-9 on 4-warp wgmma tiles; an SM issues 128 a clock, so ~14-25
weights a clock at best, where a 2.5 TB/s int8 stream needs ~10 on each of 132 SMs. Issue, not bytes, may
bound it: the sweep times both kinds.

The small in-layer matrices (2,048 outputs of a 2B's out_proj / down) have too few row blocks for 132
SMs: their K splits over programs, each writing its fp32 partial sums; the split that arrives last at
the block's counter adds them up in split order (the same sum on every run) and runs the epilogue.
Fused epilogues: the residual add (out_proj, o_proj, down) and SwiGLU over gate and up (two weights,
one read of x). Every output row is its own dot products: no row's result reads another row.

Tiles come from `rows_tuning.py` (swept on the H200 by `benchmarks/bench_batch_step.py --sweep`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lmbundle.models.linear import BLOCK, Linear

from . import interpreted

GROUP = tl.constexpr(BLOCK)
MAX_ROWS = 64  # rows of x one launch takes (the tile's short side)


class LinearTiles(NamedTuple):
    """BLOCK_N weight rows a program, GROUPS of 32 inputs a loop step, the K splits, warps and stages."""

    block_n: int
    groups: int
    split_k: int
    warps: int
    stages: int


@triton.jit
def _scales(s_ptrs, g, ok, groups_left, GROUPS: tl.constexpr):
    """The fp16 scales of a loop step's GROUPS groups (consecutive in each weight row): [BLOCK_N, GROUPS],
    or [BLOCK_N] for one group; 0 past the split's last group (its weights load as 0, and 0 * 0 stays 0
    where whatever lies past a row's scales might be a NaN)."""
    if GROUPS == 1:
        scales = tl.load(s_ptrs, mask=ok & (groups_left > 0), other=0.0)
    else:
        scales = tl.load(s_ptrs[:, None] + g[None, :], mask=ok[:, None] & (g[None, :] < groups_left), other=0.0)
    return scales


@triton.jit
def _column(scales, j: tl.constexpr, GROUPS: tl.constexpr):
    """Column j of `_scales` (by splits, which keep the tiles' layouts: a masked sum made Triton move the
    weight tiles through shared memory instead)."""
    if GROUPS == 1:
        column = scales
    elif GROUPS == 2:
        first, second = tl.split(scales)
        column = first if j == 0 else second
    else:
        even, odd = tl.split(tl.reshape(scales, [scales.shape[0], GROUPS // 2, 2]))
        column = _column(even if j % 2 == 0 else odd, j // 2, GROUPS // 2)
    return column


@triton.jit
def _weight_tile(q_ptrs, scales, j: tl.constexpr, ok, dtype: tl.constexpr, GROUPS: tl.constexpr,
                 FP32_MATH: tl.constexpr):
    """Group j's int8 tile [BLOCK_N, 32] with its scale (column j of `scales`): q * scale rounded once to
    `dtype`, the values of `models.linear.dequantize` (a 16-bit product is the exact one rounded;
    FP32_MATH: made in fp32, and given as fp32)."""
    q = tl.load(q_ptrs, mask=ok[:, None], other=0)
    s = _column(scales, j, GROUPS).to(dtype)
    if FP32_MATH:
        return (q.to(tl.float32) * s.to(tl.float32)[:, None]).to(dtype).to(tl.float32)
    return q.to(dtype) * s[:, None]


@triton.jit
def _finish(acc, acc2, n, r, n_ok, r_ok, res_ptr, y_ptr, N, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    """acc [BLOCK_N, BLOCK_R] (and the up projection's acc2) -> y [R, N], rounded as the reference rounds:
    each linear's output to x's dtype, then silu(gate) * up, or residual + output."""
    dtype = y_ptr.dtype.element_ty
    y = acc.to(dtype).to(tl.float32)
    if SWIGLU:
        y = (y * tl.sigmoid(y)).to(dtype).to(tl.float32) * acc2.to(dtype).to(tl.float32)
    offsets = r[None, :] * N + n[:, None]
    ok = n_ok[:, None] & r_ok[None, :]
    if RESIDUAL:
        y = tl.load(res_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + y
    tl.store(y_ptr + offsets, y.to(dtype), mask=ok)


@triton.jit
def _rows_linear_kernel(x_ptr, x_stride, q_ptr, s_ptr, q2_ptr, s2_ptr, res_ptr, y_ptr, part_ptr, count_ptr,
                        rows, N, K, split_len, splits,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT: tl.constexpr,
                        SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, FP32_MATH: tl.constexpr, PDL: tl.constexpr):
    """Program (block of BLOCK_N outputs, K split): its weight rows over inputs [split * split_len, +split_len)
    against every row of x; without SPLIT the epilogue, else the partials and, last to arrive, the sum
    of all splits and the epilogue. part [splits, 1 or 2, R, N] fp32; count [blocks] int32, zero between
    launches (the last split puts it back). FP32_MATH: fp32 operands (fp32 x, or the interpreter)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    c = tl.arange(0, GROUP)
    n_ok = n < N
    r_ok = r < rows
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    q_offsets = n[:, None].to(tl.int64) * K + c[None, :]
    s_offsets = n.to(tl.int64) * (K // GROUP)
    x_offsets = r[None, :] * x_stride + c[:, None]  # x.T tiles [32, BLOCK_R]
    k_start = split * split_len
    k_end = tl.minimum(K, k_start + split_len)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    # the scales of each loop step are loaded one step ahead: 2-byte loads that Triton does not stage
    # through shared memory with the tiles, so their latency would stall every step
    g = tl.arange(0, GROUPS)
    step: tl.constexpr = GROUP * GROUPS
    scales = _scales(s_ptr + s_offsets + k_start // GROUP, g, n_ok, (k_end - k_start) // GROUP, GROUPS)
    scales2 = scales
    if SWIGLU:
        scales2 = _scales(s2_ptr + s_offsets + k_start // GROUP, g, n_ok, (k_end - k_start) // GROUP, GROUPS)
    for k0 in range(k_start, k_end, step):
        left = (k_end - k0 - step) // GROUP  # groups past this step (<= 0: none)
        next_scales = _scales(s_ptr + s_offsets + (k0 + step) // GROUP, g, n_ok, left, GROUPS)
        next_scales2 = next_scales
        if SWIGLU:
            next_scales2 = _scales(s2_ptr + s_offsets + (k0 + step) // GROUP, g, n_ok, left, GROUPS)
        for j in tl.static_range(GROUPS):
            k = k0 + j * GROUP
            inside = k < k_end
            x_t = tl.load(x_ptr + x_offsets + k, mask=r_ok[None, :] & inside, other=0.0)
            if FP32_MATH:
                x_t = x_t.to(tl.float32)
            w = _weight_tile(q_ptr + q_offsets + k, scales, j, n_ok & inside, dtype, GROUPS, FP32_MATH)
            acc = tl.dot(w, x_t, acc, input_precision="ieee")
            if SWIGLU:
                w2 = _weight_tile(q2_ptr + q_offsets + k, scales2, j, n_ok & inside, dtype, GROUPS, FP32_MATH)
                acc2 = tl.dot(w2, x_t, acc2, input_precision="ieee")
        scales, scales2 = next_scales, next_scales2
    if not SPLIT:
        _finish(acc, acc2, n, r, n_ok, r_ok, res_ptr, y_ptr, N, SWIGLU, RESIDUAL)
    else:
        parts: tl.constexpr = 2 if SWIGLU else 1
        offsets = r[None, :] * N + n[:, None]
        ok = n_ok[:, None] & r_ok[None, :]
        tl.store(part_ptr + split * parts * rows * N + offsets, acc, mask=ok)
        if SWIGLU:
            tl.store(part_ptr + (split * parts + 1) * rows * N + offsets, acc2, mask=ok)
        tl.debug_barrier()  # every thread's partials are written before the counter says so (release below)
        arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            total = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
            total2 = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
            for j in range(splits):  # in split order, from L2 (.cg): the same sum on every run
                total += tl.load(part_ptr + j * parts * rows * N + offsets, mask=ok, other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    total2 += tl.load(part_ptr + (j * parts + 1) * rows * N + offsets, mask=ok, other=0.0,
                                      cache_modifier=".cg")
            _finish(total, total2, n, r, n_ok, r_ok, res_ptr, y_ptr, N, SWIGLU, RESIDUAL)
            tl.atomic_xchg(count_ptr + block, 0)


def takes(x: torch.Tensor, w: Linear) -> bool:
    """Rows this kernel computes: at most MAX_ROWS of a 16/32-bit x (unit column stride) against an int8
    block-32 weight of matching width."""
    return (w.quantized and x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1
            and x.shape[1] == w.in_features and w.scales.shape[1] * BLOCK == w.in_features
            and w.qweight.is_contiguous() and w.scales.is_contiguous()
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def row_tile(rows: int) -> int:
    """The product's short side for `rows` rows of x: a power of two from 16 to MAX_ROWS."""
    return max(16, triton.next_power_of_2(rows))


def rows_linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor], tiles: LinearTiles,
                counters: torch.Tensor, up: tuple[torch.Tensor, torch.Tensor] | None = None,
                residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """x [R, K] -> x @ W.T [R, N] in x's dtype for weight = (int8 [N, K], fp16 scales [N, K / 32]) (`takes`
    says which x); with `up` (the same layout), silu(x @ W.T) * (x @ U.T); with `residual` [R, N],
    residual + x @ W.T. `counters`: int32 zeros, at least one per block of tiles.block_n outputs, shared by
    the calls of one stream (each call leaves them zero)."""
    (q, s), rows = weight, x.shape[0]
    n_out, k_in = q.shape
    step = BLOCK * tiles.groups
    split_len = triton.cdiv(triton.cdiv(k_in, tiles.split_k), step) * step
    splits = triton.cdiv(k_in, split_len)  # no empty split
    blocks = triton.cdiv(n_out, tiles.block_n)
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    parts = (torch.empty(splits, 2 if up is not None else 1, rows, n_out, dtype=torch.float32, device=x.device)
             if splits > 1 else y)
    if splits > 1:
        assert counters.numel() >= blocks, f"{blocks} counters needed"
    q2, s2 = up if up is not None else weight
    _rows_linear_kernel[(blocks, splits)](
        x, x.stride(0), q, s, q2, s2, residual if residual is not None else y, y, parts, counters,
        rows, n_out, k_in, split_len, splits, BLOCK_R=row_tile(rows), BLOCK_N=tiles.block_n, GROUPS=tiles.groups,
        SPLIT=splits > 1, SWIGLU=up is not None, RESIDUAL=residual is not None,
        FP32_MATH=x.dtype == torch.float32 or interpreted(), PDL=pdl,
        num_warps=tiles.warps, num_stages=tiles.stages, launch_pdl=pdl,
    )
    return y
