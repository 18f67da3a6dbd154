"""Triton GEMV for decode: y = x @ W.T for one row of x, W int8 (+ fp16 block-32 scales) or dense bf16/fp16,
with the layer's neighbours fused in: RMSNorm of x before (the mixer and MLP input norms, the final norm)
or the GDN output's gated RMSNorm, SwiGLU over two weights, and after it the residual add or the GDN
causal conv (a per-channel op, so the GEMV program that makes a channel owns its conv state).

Decode is bound by the bytes of weights read, so each program streams a [BLOCK_N rows, BLOCK_G groups,
32] tile (16-byte vectors along the row) and never writes a dequantized copy. int8 bytes become fp32 by
an integer add into the mantissa of 2**23 + 128 and one subtraction (off the I2F pipe; within noise of
I2F on the H100, which stays selectable). Per-group dot products accumulate in fp32 and take their
scale once per group.

With PDL (programmatic dependent launch, Hopper) a kernel starts while its predecessor finishes: it
loads its first weight tile (weights never depend on the previous kernel), then waits on the
predecessor (`gdc_wait`) before it reads x. Small per-layer GEMVs are latency-bound, and this hides
their launch and first DRAM round trip behind the previous kernel.

Imported only where Triton is installed (`triton_ops.py` is its one user).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmbundle.models.linear import BLOCK

GROUP = BLOCK  # input columns that share one int8 scale; also the dense tile's inner width
MAX_ROWS = 4  # rows of x one call takes (one launch per row)
_GROUP = tl.constexpr(GROUP)
_FLOAT_BIAS_BITS = tl.constexpr(0x4B000080)  # fp32 bits of 2**23 + 128
_FLOAT_BIAS = tl.constexpr(8388736.0)  # 2**23 + 128


@triton.jit
def _to_float(w, QUANT: tl.constexpr, BY_BITS: tl.constexpr):
    """A loaded weight tile as fp32: int8 exactly (by bits or I2F), or a dense tile's value."""
    if QUANT and BY_BITS:
        return (w.to(tl.int32) + _FLOAT_BIAS_BITS).to(tl.float32, bitcast=True) - _FLOAT_BIAS
    return w.to(tl.float32)


@triton.jit
def _load_tile(w_ptrs, s_ptrs, g0, tile_ok, scale_ok, QUANT: tl.constexpr):
    """Raw weight tile [BLOCK_N, BLOCK_G, 32] and its scales [BLOCK_N, BLOCK_G] (1.0 for dense)."""
    w = tl.load(w_ptrs + g0 * _GROUP, mask=tile_ok, other=0)
    if QUANT:
        s = tl.load(s_ptrs + g0, mask=scale_ok, other=0.0).to(tl.float32)
    else:
        s = tl.full(scale_ok.shape, 1.0, tl.float32)
    return w, s


@triton.jit
def _conv_silu(new, conv_ptr, conv_w_ptr, channels, ok, TAPS: tl.constexpr, TAPS_BLOCK: tl.constexpr):
    """Causal depthwise conv + SiLU for the new inputs `new` (activation dtype) of `channels`, shifting
    their conv state [C, TAPS - 1]. fp32 out, rounded to the activation dtype like the reference."""
    taps = tl.arange(0, TAPS_BLOCK)[None, :]
    state = conv_ptr + channels[:, None] * (TAPS - 1) + taps
    history = tl.load(state, mask=ok[:, None] & (taps < TAPS - 1), other=0.0).to(tl.float32)
    weights = tl.load(conv_w_ptr + channels[:, None] * TAPS + taps, mask=ok[:, None] & (taps < TAPS), other=0.0)
    window = tl.where(taps == TAPS - 1, new[:, None].to(tl.float32), history)
    out = tl.sum(window * weights.to(tl.float32), axis=1)
    shifted = tl.load(state + 1, mask=ok[:, None] & (taps < TAPS - 2), other=0.0)
    shifted = tl.where(taps == TAPS - 2, new[:, None], shifted)
    tl.store(state, shifted, mask=ok[:, None] & (taps < TAPS - 1))
    return (out * tl.sigmoid(out)).to(new.dtype).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, norm_ptr, eps, res_ptr, w_ptr, s_ptr, w2_ptr, s2_ptr, y_ptr, num_rows, num_groups,
                 conv_ptr, conv_w_ptr, conv_channels, gate_ptr, sumsq_ptr,
                 BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, QUANT: tl.constexpr, SWIGLU: tl.constexpr,
                 NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr, NORM_BLOCK: tl.constexpr,
                 GATED_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_SPLITS: tl.constexpr,
                 RESIDUAL: tl.constexpr, CONV: tl.constexpr, TAPS: tl.constexpr, TAPS_BLOCK: tl.constexpr,
                 PDL: tl.constexpr, BY_BITS: tl.constexpr):
    """y[rows] = h @ W.T (or silu(h @ W.T) * (h @ W2.T)) where h is x, rms_norm(x) (NORM) or the GDN
    output norm of x (GATED_NORM: per-head rms from `sumsq` partials, times silu(gate)); then
    + res[rows] (RESIDUAL), or the GDN causal conv + SiLU on rows below conv_channels (CONV)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, _GROUP)
    row_ok = rows < num_rows
    in_features = num_groups * _GROUP
    w_offsets = rows[:, None, None].to(tl.int64) * in_features + groups[None, :, None] * _GROUP + cols[None, None, :]
    s_offsets = rows[:, None].to(tl.int64) * num_groups + groups[None, :]
    x_offsets = groups[:, None] * _GROUP + cols[None, :]

    # the first tiles do not depend on the previous kernel: issue them before waiting on it
    group_ok = groups < num_groups
    tile_ok = row_ok[:, None, None] & group_ok[None, :, None]
    scale_ok = row_ok[:, None] & group_ok[None, :]
    w, s = _load_tile(w_ptr + w_offsets, s_ptr + s_offsets, 0, tile_ok, scale_ok, QUANT)
    if SWIGLU:
        w2, s2 = _load_tile(w2_ptr + w_offsets, s2_ptr + s_offsets, 0, tile_ok, scale_ok, QUANT)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    rstd = 0.0
    if NORM:
        all_cols = tl.arange(0, NORM_BLOCK)
        xs = tl.load(x_ptr + all_cols, mask=all_cols < in_features, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xs * xs, axis=0) / in_features + eps)

    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, num_groups, BLOCK_G):
        group_ok = (g0 + groups) < num_groups
        next_ok = (g0 + BLOCK_G + groups) < num_groups
        next_tile_ok = row_ok[:, None, None] & next_ok[None, :, None]
        next_scale_ok = row_ok[:, None] & next_ok[None, :]
        w_next, s_next = _load_tile(w_ptr + w_offsets, s_ptr + s_offsets, g0 + BLOCK_G, next_tile_ok,
                                    next_scale_ok, QUANT)
        x_mask = group_ok[:, None]
        in_cols = g0 * _GROUP + x_offsets
        h = tl.load(x_ptr + in_cols, mask=x_mask, other=0.0)
        if NORM:  # rms_norm's roundings: to x's dtype after the scale (and after the weight)
            nw = tl.load(norm_ptr + in_cols, mask=x_mask, other=0.0).to(tl.float32)
            normed = h.to(tl.float32) * rstd
            if ZERO_CENTERED:
                h = (normed * (1.0 + nw)).to(h.dtype)
            else:
                h = (nw * normed.to(h.dtype).to(tl.float32)).to(h.dtype)
        if GATED_NORM:  # gated_rms_norm per head of HEAD_DIM columns; x holds the rounded GDN output
            head = in_cols // HEAD_DIM
            sumsq = tl.load(sumsq_ptr + head * HEAD_SPLITS, mask=x_mask, other=1.0)
            for j in tl.static_range(1, HEAD_SPLITS):
                sumsq += tl.load(sumsq_ptr + head * HEAD_SPLITS + j, mask=x_mask, other=0.0)
            normed = (h.to(tl.float32) * tl.rsqrt(sumsq / HEAD_DIM + eps)).to(h.dtype).to(tl.float32)
            gate = tl.load(gate_ptr + in_cols, mask=x_mask, other=0.0).to(tl.float32)
            nw = tl.load(norm_ptr + in_cols % HEAD_DIM, mask=x_mask, other=0.0).to(tl.float32)
            h = (nw * normed * (gate * tl.sigmoid(gate))).to(h.dtype)
        h = h.to(tl.float32)
        acc += tl.sum(_to_float(w, QUANT, BY_BITS) * h[None, :, :], axis=2) * s
        if SWIGLU:
            w2_next, s2_next = _load_tile(w2_ptr + w_offsets, s2_ptr + s_offsets, g0 + BLOCK_G, next_tile_ok,
                                          next_scale_ok, QUANT)
            acc2 += tl.sum(_to_float(w2, QUANT, BY_BITS) * h[None, :, :], axis=2) * s2
            w2, s2 = w2_next, s2_next
        w, s = w_next, s_next

    y = tl.sum(acc, axis=1)
    if SWIGLU:
        up = tl.sum(acc2, axis=1)
        y = y * tl.sigmoid(y) * up
    if RESIDUAL:  # residual + linear(h), each rounded to the stream's dtype as the reference adds them
        res = tl.load(res_ptr + rows, mask=row_ok, other=0.0)
        y = res.to(tl.float32) + y.to(res.dtype).to(tl.float32)
    if CONV:  # rows of the GDN's q/k/v channels leave convolved (each channel's state has one owner)
        conv_rows = rows < conv_channels
        new = y.to(y_ptr.dtype.element_ty)
        y = tl.where(conv_rows, _conv_silu(new, conv_ptr, conv_w_ptr, rows, conv_rows & row_ok, TAPS, TAPS_BLOCK), y)
    tl.store(y_ptr + rows, y, mask=row_ok)


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


@dataclass
class GatedNormInput:
    """A GDN mixer's output before its gated RMSNorm, which the out_proj GEMV applies as it reads it:
    output [Hv * Dv] (rounded), the per-head sums of squares in `splits` partials [Hv, splits], the
    gate z [Hv * Dv] and the norm weight [Dv]; the batched step's (`triton_rows`) with a leading row axis."""

    output: torch.Tensor
    sumsq: torch.Tensor
    gate: torch.Tensor
    weight: torch.Tensor
    eps: float
    head_dim: int


Config = tuple[int, int, int, bool]  # BLOCK_N, BLOCK_G, num_warps, int8 -> fp32 by bits (else I2F)


def pick_config(out_features: int, in_features: int, normed: bool = False, swiglu: bool = False) -> Config:
    """Block sizes by shape, from sweeps on an H100 at Qwen3.5-2B shapes (benchmarks/RESULTS.md).

    Plain GEMVs (`bench_int8_gemv.py --sweep`): 8 rows a program; up to 2048 rows 64 groups a step with
    8 warps keep enough bytes in flight from the few programs, above 32 groups with 4 warps.
    With a norm prologue (`sweep_step_kernels.py`) every program re-reads x (and the norm weight),
    so programs take 16 rows, 32 for SwiGLU and the head (against 8: 8224x2048 in_proj 9.2 us against
    10.9, gate/up 14.6 against 16.7, head 215 against 249, out_proj with the gated norm 5.0 against 6.3).
    The same picks are the best on the H200, where split-K for the 2048-row GEMVs, int32 word tiles (fewer
    instructions a weight) and tensor-core group dots measure slower."""
    groups = triton.next_power_of_2(in_features // GROUP)
    if not normed:
        few_rows = out_features <= 2048
        return 8, min(64 if few_rows else 32, groups), 8 if few_rows else 4, True
    block_n = 32 if swiglu or out_features > 65536 else 16
    block_g = 64 if out_features <= 2048 else 16 if block_n == 32 or out_features > 8192 else 32
    return block_n, min(block_g, groups), 8 if block_g == 64 else 4, True


def gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
         weight2: torch.Tensor | None = None, scales2: torch.Tensor | None = None,
         norm: tuple[torch.Tensor, float, bool] | None = None, residual: torch.Tensor | None = None,
         conv: tuple[torch.Tensor, torch.Tensor] | None = None, gated_norm: "GatedNormInput | None" = None,
         pdl: bool = False, config: Config | None = None) -> torch.Tensor:
    """One row x [in] -> y [out] in x's dtype (fp32 accumulation), for int8 `weight` + `scales` or dense.

    weight2/scales2: silu(h @ W.T) * (h @ W2.T). norm = (weight, eps, zero_centered): h = rms_norm(x)
    (x's length is the hidden size). gated_norm: h = the GDN output norm of x, its unnormed `output`.
    residual [out]: returns residual + the result. conv = (conv_state [C, K-1], conv_weight [C, K]):
    the first C outputs go through the GDN causal conv + SiLU (the state shifts in place)."""
    out_features, in_features = weight.shape
    x = x.reshape(in_features)
    y = torch.empty(out_features, dtype=x.dtype, device=x.device)
    normed = (norm is not None or gated_norm is not None) and scales is not None  # swept for int8 only
    block_n, block_g, num_warps, by_bits = config or pick_config(out_features, in_features, normed,
                                                                 weight2 is not None)
    norm_weight, eps, zero_centered = norm or (x, 0.0, False)
    if gated_norm is not None:
        norm_weight, eps = gated_norm.weight, gated_norm.eps
    conv_state, conv_weight = conv or (x, x)
    taps = conv_weight.shape[-1] if conv is not None else 2
    _gemv_kernel[(triton.cdiv(out_features, block_n),)](
        x, norm_weight, eps, x if residual is None else residual, weight, weight if scales is None else scales,
        weight if weight2 is None else weight2, weight if scales2 is None else scales2, y,
        out_features, in_features // GROUP, conv_state, conv_weight, conv_state.shape[0] if conv else 0,
        gated_norm.gate if gated_norm else x, gated_norm.sumsq if gated_norm else x,
        BLOCK_N=block_n, BLOCK_G=block_g, QUANT=scales is not None, SWIGLU=weight2 is not None,
        NORM=norm is not None, ZERO_CENTERED=zero_centered, NORM_BLOCK=triton.next_power_of_2(in_features),
        GATED_NORM=gated_norm is not None, HEAD_DIM=gated_norm.head_dim if gated_norm else 1,
        HEAD_SPLITS=gated_norm.sumsq.shape[-1] if gated_norm else 1,
        RESIDUAL=residual is not None, CONV=conv is not None, TAPS=taps, TAPS_BLOCK=triton.next_power_of_2(taps),
        PDL=pdl, BY_BITS=by_bits, num_warps=num_warps, launch_pdl=pdl,
    )
    return y


def _rows(x: torch.Tensor, out_features: int, one_row) -> torch.Tensor:
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features)
    assert 1 <= x2d.shape[0] <= MAX_ROWS, f"the GEMV takes 1..{MAX_ROWS} rows of x, got {x2d.shape[0]}"
    y = torch.stack([one_row(row) for row in x2d]) if x2d.shape[0] > 1 else one_row(x2d[0]).unsqueeze(0)
    return y.reshape(*x.shape[:-1], out_features)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              config: Config | None = None) -> torch.Tensor:
    """x [..., in] (1..4 rows) @ (qweight * scales).T -> [..., out] in x's dtype; fp32 accumulation."""
    return _rows(x, qweight.shape[0], lambda row: gemv(row, qweight, scales, config=config))


def int8_swiglu(x: torch.Tensor, gate_qweight: torch.Tensor, gate_scales: torch.Tensor,
                up_qweight: torch.Tensor, up_scales: torch.Tensor,
                config: Config | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) in one pass over both weights (fp32 until the single rounding)."""
    return _rows(x, gate_qweight.shape[0],
                 lambda row: gemv(row, gate_qweight, gate_scales, up_qweight, up_scales, config=config))
