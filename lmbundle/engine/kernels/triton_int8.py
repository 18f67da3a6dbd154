"""Triton kernels for int8 weights at decode sizes: y = x @ (qweight * scale).T for 1..4 rows of x.

Decode is bound by the bytes of weights read, so each program streams a [BLOCK_N rows, BLOCK_G groups,
32] int8 tile (16-byte vectors along the row) and never writes a dequantized copy. Bytes become fp32
by an integer add into the mantissa of 2**23 + 128 and one subtraction, which keeps them off I2F
(16/clk/SM, about what the int8 stream needs at full bandwidth); on the H100 the two measured within
noise, so I2F stays selectable. Per-group dot products accumulate in fp32 and take their fp16 block
scale once per group.

Imported only on CUDA machines with Triton (see `int8_gemv.py`, which dispatches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 32  # int8 columns that share one scale; the format's block
MAX_ROWS = 4  # rows of x one launch handles (one accumulator set each)
_GROUP = tl.constexpr(GROUP)
_FLOAT_BIAS_BITS = tl.constexpr(0x4B000080)  # fp32 bits of 2**23 + 128
_FLOAT_BIAS = tl.constexpr(8388736.0)  # 2**23 + 128


@triton.jit
def _int8_to_float(w, BY_BITS: tl.constexpr):
    """int8 -> fp32, exactly: by integer add into the mantissa of 2**23 + 128, or by I2F."""
    if BY_BITS:
        return (w.to(tl.int32) + _FLOAT_BIAS_BITS).to(tl.float32, bitcast=True) - _FLOAT_BIAS
    else:
        return w.to(tl.float32)


@triton.jit
def _group_dot(w, x_row_ptr, x_offsets, x_mask):
    """Sum over each group's 32 columns of weight * x: [BLOCK_N, BLOCK_G, 32] -> [BLOCK_N, BLOCK_G]."""
    x = tl.load(x_row_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
    return tl.sum(w * x[None, :, :], axis=2)


@triton.jit
def _rows_dot(x_ptr, stride_x, w_ptr, s_ptr, rows, num_rows, num_groups,
              M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BY_BITS: tl.constexpr):
    """x[m] . dequantized weight row, for each of the BLOCK_N `rows` and m < M (fp32; unused m give 0)."""
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, _GROUP)
    row_ok = rows < num_rows
    w_ptrs = w_ptr + rows[:, None, None].to(tl.int64) * (num_groups * _GROUP) + groups[None, :, None] * _GROUP \
        + cols[None, None, :]
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * num_groups + groups[None, :]
    x_offsets = groups[:, None] * _GROUP + cols[None, :]
    acc0 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, num_groups, BLOCK_G):
        group_ok = (g0 + groups) < num_groups
        w = tl.load(w_ptrs + g0 * _GROUP, mask=row_ok[:, None, None] & group_ok[None, :, None], other=0)
        w = _int8_to_float(w, BY_BITS)
        scale = tl.load(s_ptrs + g0, mask=row_ok[:, None] & group_ok[None, :], other=0.0).to(tl.float32)
        x_mask = group_ok[:, None]
        x_row = x_ptr + g0 * _GROUP
        acc0 += _group_dot(w, x_row, x_offsets, x_mask) * scale
        if M > 1:
            acc1 += _group_dot(w, x_row + stride_x, x_offsets, x_mask) * scale
        if M > 2:
            acc2 += _group_dot(w, x_row + 2 * stride_x, x_offsets, x_mask) * scale
        if M > 3:
            acc3 += _group_dot(w, x_row + 3 * stride_x, x_offsets, x_mask) * scale
    return tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1)


@triton.jit
def _silu_mul(gate, up):
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _int8_gemv_kernel(x_ptr, stride_x, w_ptr, s_ptr, w2_ptr, s2_ptr, y_ptr, stride_y, num_rows, num_groups,
                      M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SWIGLU: tl.constexpr,
                      BY_BITS: tl.constexpr):
    """y[m, rows] = x[m] @ W.T, or silu(x[m] @ W.T) * (x[m] @ W2.T) when SWIGLU."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    y0, y1, y2, y3 = _rows_dot(x_ptr, stride_x, w_ptr, s_ptr, rows, num_rows, num_groups,
                               M, BLOCK_N, BLOCK_G, BY_BITS)
    if SWIGLU:
        u0, u1, u2, u3 = _rows_dot(x_ptr, stride_x, w2_ptr, s2_ptr, rows, num_rows, num_groups,
                                   M, BLOCK_N, BLOCK_G, BY_BITS)
        y0 = _silu_mul(y0, u0)
        y1 = _silu_mul(y1, u1)
        y2 = _silu_mul(y2, u2)
        y3 = _silu_mul(y3, u3)
    row_ok = rows < num_rows
    tl.store(y_ptr + rows, y0, mask=row_ok)
    if M > 1:
        tl.store(y_ptr + stride_y + rows, y1, mask=row_ok)
    if M > 2:
        tl.store(y_ptr + 2 * stride_y + rows, y2, mask=row_ok)
    if M > 3:
        tl.store(y_ptr + 3 * stride_y + rows, y3, mask=row_ok)


Config = tuple[int, int, int, bool]  # BLOCK_N, BLOCK_G, num_warps, int8 -> fp32 by bits (else I2F)


def pick_config(out_features: int, in_features: int) -> Config:
    """Block sizes by shape, from `bench_int8_gemv.py --sweep` on an H100 (benchmarks/RESULTS.md).

    8 rows a program throughout; up to 2048 rows, 64 groups a step with 8 warps keep enough bytes in
    flight from the few programs; above, 32 groups with 4 warps."""
    few_rows = out_features <= 2048
    block_g = min(64 if few_rows else 32, triton.next_power_of_2(in_features // GROUP))
    return 8, block_g, 8 if few_rows else 4, True


def _launch(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]],
            config: Config | None) -> torch.Tensor:
    qweight, scales = weights[0]
    out_features, in_features = qweight.shape
    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    rows = x2d.shape[0]
    assert 1 <= rows <= MAX_ROWS, f"the GEMV kernel takes 1..{MAX_ROWS} rows of x, got {rows}"
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    block_n, block_g, num_warps, by_bits = config or pick_config(out_features, in_features)
    w2, s2 = weights[-1]
    _int8_gemv_kernel[(triton.cdiv(out_features, block_n),)](
        x2d, x2d.stride(0), qweight, scales, w2, s2, y, y.stride(0),
        out_features, in_features // GROUP,
        M=rows, BLOCK_N=block_n, BLOCK_G=block_g, SWIGLU=len(weights) == 2, BY_BITS=by_bits,
        num_warps=num_warps,
    )
    return y.reshape(*x.shape[:-1], out_features)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              config: Config | None = None) -> torch.Tensor:
    """x [..., in] (1..4 rows) @ (qweight * scales).T -> [..., out] in x's dtype; fp32 accumulation."""
    return _launch(x, [(qweight, scales)], config)


def int8_swiglu(x: torch.Tensor, gate_qweight: torch.Tensor, gate_scales: torch.Tensor,
                up_qweight: torch.Tensor, up_scales: torch.Tensor,
                config: Config | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) in one pass over both weights (fp32 until the single rounding)."""
    return _launch(x, [(gate_qweight, gate_scales), (up_qweight, up_scales)], config)
