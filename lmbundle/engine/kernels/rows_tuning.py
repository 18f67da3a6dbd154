"""Tile sizes of the batched step's kernels (`triton_rows.py`, `triton_rows_linear.py`): one table, which
`benchmarks/bench_batch_step.py --sweep --write-table` rewrites from its measurements (the block between
the markers below; the rest of this file is not touched).

A configuration changes the order of some sums (a K split, a softmax split, a delta-rule value block), so
a row's bits depend on it; it is chosen from the shapes and the scheduler's fixed row count only, never
from which rows are live, so a sequence computes the same bits whatever runs beside it.
"""

from __future__ import annotations

import triton

from .triton_rows_linear import LinearTiles, row_tile

# --- table: written by benchmarks/bench_batch_step.py --sweep --write-table ---
SOURCE = "not yet swept: the defaults below are estimates from the sm_90 compile (registers, SASS per weight)"
LINEAR = {  # (out features, in features, swiglu, row tile): (block_n, groups, split_k, warps, stages)
}
ROWS = {  # kernel: its launch parameters
    "rms_norm_rows": {"num_warps": 4},
    "conv_silu_rows": {"block": 1024, "num_warps": 4},
    "gated_delta_rows": {"block_v": 16, "num_warps": 2},
    "gated_norm_rows": {"num_warps": 1},
    "attention_rows": {"split_len": 256, "block_l": 32, "num_warps": 4, "num_stages": 3},
}
# --- end of table ---

# programs a linear aims for when no measurement says otherwise: ~3 on each of an H100's / H200's 132 SMs
TARGET_PROGRAMS = 396


def fits(block_n: int, groups: int, warps: int, columns: int) -> bool:
    """Whether a tile's fp32 accumulators ([block_n, columns]: the row tile, twice for SwiGLU) leave room in
    a thread's 255 registers: more than 64 a thread (48 with 4 groups a step) spilled in the sm_90 compile."""
    return block_n * columns / (32 * warps) <= (48 if groups == 4 else 64)


def linear_tiles(out_features: int, in_features: int, rows: int, swiglu: bool = False) -> LinearTiles:
    """The table's tiles for this shape and row count, else 64 outputs a program on mma.sync tiles (2 warps:
    ~6 SASS instructions a weight on sm_90, against ~7.5-9 for wgmma's 4-warp tiles; 4 warps where 2 would
    spill) with K split until the launch has about TARGET_PROGRAMS programs."""
    hit = LINEAR.get((out_features, in_features, swiglu, row_tile(rows)))
    if hit is not None:
        return LinearTiles(*hit)
    blocks = triton.cdiv(out_features, 64)
    split = max(1, min(round(TARGET_PROGRAMS / blocks), in_features // 256))
    warps = 2 if fits(64, 2, 2, row_tile(rows) * (2 if swiglu else 1)) else 4
    return LinearTiles(64, 2, split, warps, 4)


def rows_config(kernel: str) -> dict:
    """The launch parameters of a rows kernel (a copy: callers may change it)."""
    return dict(ROWS[kernel])
