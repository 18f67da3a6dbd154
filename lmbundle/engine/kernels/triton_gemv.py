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

import os
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


# int8 x4 (one register) -> 4 fp32 holding 2**23 + 128 + w: flip the sign bits (w + 128 as a byte), then
# put each byte under the exponent of 2**23 (0x4B0000xx): one LOP3 per 4 weights and one PRMT per weight
_PRMT_ASM = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7540;
prmt.b32 $1, t, 0x4B000000, 0x7541;
prmt.b32 $2, t, 0x4B000000, 0x7542;
prmt.b32 $3, t, 0x4B000000, 0x7543;
}""")


# int8 x4 (one int32 word) -> the 4 weights as fp32: the byte permutes above, then the bias subtracted
_WORD_ASM = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7540;
prmt.b32 $1, t, 0x4B000000, 0x7541;
prmt.b32 $2, t, 0x4B000000, 0x7542;
prmt.b32 $3, t, 0x4B000000, 0x7543;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}""")


@triton.jit
def _word_floats(w, ASM: tl.constexpr):
    """The 4 int8 weights packed in each int32 of w (byte k = column 4j + k), as 4 fp32 tensors."""
    if ASM:
        return tl.inline_asm_elementwise(_WORD_ASM, "=r,=r,=r,=r,r", [w], is_pure=True, pack=1,
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32))
    return ((w << 24) >> 24).to(tl.float32), ((w << 16) >> 24).to(tl.float32), \
        ((w << 8) >> 24).to(tl.float32), (w >> 24).to(tl.float32)


@triton.jit
def _to_float(w, QUANT: tl.constexpr, BY_BITS: tl.constexpr):
    """A loaded weight tile as fp32: int8 exactly (BY_BITS 1: integer add into the mantissa of 2**23 + 128;
    2: the same float built by byte permutes, 4 weights a register; 0: I2F), or a dense tile's value."""
    if QUANT and BY_BITS == 2:
        biased = tl.inline_asm_elementwise(_PRMT_ASM, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        return biased - _FLOAT_BIAS
    if QUANT and BY_BITS == 1:
        return (w.to(tl.int32) + _FLOAT_BIAS_BITS).to(tl.float32, bitcast=True) - _FLOAT_BIAS
    return w.to(tl.float32)


@triton.jit
def _load_tile(w_ptrs, s_ptrs, g0, tile_ok, scale_ok, QUANT: tl.constexpr, WIDTH: tl.constexpr = 32):
    """Raw weight tile [BLOCK_N, BLOCK_G, WIDTH] (32 int8 or dense values a group, or 8 int32 words of 4
    int8) and its scales [BLOCK_N, BLOCK_G] (1.0 for dense)."""
    w = tl.load(w_ptrs + g0 * WIDTH, mask=tile_ok, other=0)
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
                 conv_ptr, conv_w_ptr, conv_channels, gate_ptr, sumsq_ptr, part_ptr, count_ptr, split_groups,
                 BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, QUANT: tl.constexpr, SWIGLU: tl.constexpr,
                 NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr, NORM_BLOCK: tl.constexpr,
                 GATED_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_SPLITS: tl.constexpr,
                 RESIDUAL: tl.constexpr, CONV: tl.constexpr, TAPS: tl.constexpr, TAPS_BLOCK: tl.constexpr,
                 SPLIT_K: tl.constexpr, PDL: tl.constexpr, BY_BITS: tl.constexpr, MMA: tl.constexpr,
                 WORDS: tl.constexpr, ASM: tl.constexpr):
    """y[rows] = h @ W.T (or silu(h @ W.T) * (h @ W2.T)) where h is x, rms_norm(x) (NORM) or the GDN
    output norm of x (GATED_NORM: per-head rms from `sumsq` partials, times silu(gate)); then
    + res[rows] (RESIDUAL), or the GDN causal conv + SiLU on rows below conv_channels (CONV).

    SPLIT_K > 1 (program (row block, split), split_groups groups each): each split writes its fp32 partial
    dot products to part [SPLIT_K, rows], and the split that arrives last at the row block's counter sums
    them in split order (deterministic), applies the epilogue and puts the counter back to 0.

    MMA (16-bit x, BLOCK_G 16): the tile's per-group dot products run on the tensor cores, one group per
    row of a [16, BLOCK_G * 32] operand holding h on the group's own columns (zeros elsewhere), against
    the int8 values as exact 16-bit numbers: the group scales apply to the [16, BLOCK_N] result, and
    the loop spends ~3.5 instructions a weight (conversion) instead of ~7-10 (conversion, FMA, the
    broadcast of h).

    WORDS (int8): w_ptr/w2_ptr are the weights viewed as int32, loaded as [BLOCK_N, BLOCK_G, 8] words; byte k of
    word j is column 4j + k, and h comes in four strided pieces. Each word becomes 4 floats with 1 LOP3 +
    4 PRMT + 4 FADD (ASM: inline PTX; else shifts, for Triton's interpreter): ~5-6 instructions a weight
    in the loop against ~7-10 for int8 tiles, whose bytes Triton unpacks and re-packs one by one."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    WIDTH: tl.constexpr = 8 if WORDS else 32  # tile elements a group: int32 words, or values
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, WIDTH)
    row_ok = rows < num_rows
    in_features = num_groups * _GROUP
    g_start = split * split_groups
    g_end = tl.minimum(g_start + split_groups, num_groups)
    w_offsets = (rows[:, None, None].to(tl.int64) * (num_groups * WIDTH) + groups[None, :, None] * WIDTH
                 + cols[None, None, :])
    s_offsets = rows[:, None].to(tl.int64) * num_groups + groups[None, :]
    x_offsets = groups[:, None] * _GROUP + cols[None, :] * (4 if WORDS else 1)

    # the first tiles do not depend on the previous kernel: issue them before waiting on it
    group_ok = (g_start + groups) < g_end
    tile_ok = row_ok[:, None, None] & group_ok[None, :, None]
    scale_ok = row_ok[:, None] & group_ok[None, :]
    w, s = _load_tile(w_ptr + w_offsets, s_ptr + s_offsets, g_start, tile_ok, scale_ok, QUANT, WIDTH)
    if SWIGLU:
        w2, s2 = _load_tile(w2_ptr + w_offsets, s2_ptr + s_offsets, g_start, tile_ok, scale_ok, QUANT, WIDTH)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    rstd = 0.0
    if NORM:
        all_cols = tl.arange(0, NORM_BLOCK)
        xs = tl.load(x_ptr + all_cols, mask=all_cols < in_features, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xs * xs, axis=0) / in_features + eps)

    if MMA:
        acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(g_start, g_end, BLOCK_G):
        group_ok = (g0 + groups) < g_end
        next_ok = (g0 + BLOCK_G + groups) < g_end
        next_tile_ok = row_ok[:, None, None] & next_ok[None, :, None]
        next_scale_ok = row_ok[:, None] & next_ok[None, :]
        w_next, s_next = _load_tile(w_ptr + w_offsets, s_ptr + s_offsets, g0 + BLOCK_G, next_tile_ok,
                                    next_scale_ok, QUANT, WIDTH)
        x_mask = group_ok[:, None]
        in_cols = g0 * _GROUP + x_offsets
        h = _input(x_ptr, in_cols, x_mask, norm_ptr, rstd, eps, gate_ptr, sumsq_ptr, NORM, ZERO_CENTERED, GATED_NORM,
                   HEAD_DIM, HEAD_SPLITS)
        if WORDS:
            h1 = _input(x_ptr, in_cols + 1, x_mask, norm_ptr, rstd, eps, gate_ptr, sumsq_ptr, NORM, ZERO_CENTERED,
                        GATED_NORM, HEAD_DIM, HEAD_SPLITS).to(tl.float32)
            h2 = _input(x_ptr, in_cols + 2, x_mask, norm_ptr, rstd, eps, gate_ptr, sumsq_ptr, NORM, ZERO_CENTERED,
                        GATED_NORM, HEAD_DIM, HEAD_SPLITS).to(tl.float32)
            h3 = _input(x_ptr, in_cols + 3, x_mask, norm_ptr, rstd, eps, gate_ptr, sumsq_ptr, NORM, ZERO_CENTERED,
                        GATED_NORM, HEAD_DIM, HEAD_SPLITS).to(tl.float32)
            h = h.to(tl.float32)
            acc += _word_dots(w, h, h1, h2, h3, ASM) * s
        elif MMA:  # row j of the operand: h on group j's columns
            a = tl.where(groups[:, None, None] == groups[None, :, None], h[None, :, :], 0.0).to(h.dtype)
            a = tl.reshape(a, [BLOCK_G, BLOCK_G * _GROUP])
            acc += _group_dots(a, w, BLOCK_N, BLOCK_G, QUANT, BY_BITS) * tl.trans(s)
        else:
            h = h.to(tl.float32)
            acc += tl.sum(_to_float(w, QUANT, BY_BITS) * h[None, :, :], axis=2) * s
        if SWIGLU:
            w2_next, s2_next = _load_tile(w2_ptr + w_offsets, s2_ptr + s_offsets, g0 + BLOCK_G, next_tile_ok,
                                          next_scale_ok, QUANT, WIDTH)
            if WORDS:
                acc2 += _word_dots(w2, h, h1, h2, h3, ASM) * s2
            elif MMA:
                acc2 += _group_dots(a, w2, BLOCK_N, BLOCK_G, QUANT, BY_BITS) * tl.trans(s2)
            else:
                acc2 += tl.sum(_to_float(w2, QUANT, BY_BITS) * h[None, :, :], axis=2) * s2
            w2, s2 = w2_next, s2_next
        w, s = w_next, s_next

    if MMA:
        y = tl.sum(acc, axis=0)
    else:
        y = tl.sum(acc, axis=1)
    if SWIGLU:
        if MMA:
            up = tl.sum(acc2, axis=0)
        else:
            up = tl.sum(acc2, axis=1)
        y = y * tl.sigmoid(y) * up
    if SPLIT_K == 1:
        _finish(y, rows, row_ok, res_ptr, y_ptr, conv_ptr, conv_w_ptr, conv_channels, RESIDUAL, CONV, TAPS,
                TAPS_BLOCK)
    else:
        tl.store(part_ptr + split * num_rows + rows, y, mask=row_ok)
        tl.debug_barrier()  # every thread's partial is written before the counter says so (release below)
        arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):  # in split order, from L2 (.cg): the same sum on every run
                total += tl.load(part_ptr + j * num_rows + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            _finish(total, rows, row_ok, res_ptr, y_ptr, conv_ptr, conv_w_ptr, conv_channels, RESIDUAL, CONV, TAPS,
                    TAPS_BLOCK)
            tl.atomic_xchg(count_ptr + block, 0)


@triton.jit
def _input(x_ptr, in_cols, x_mask, norm_ptr, rstd, eps, gate_ptr, sumsq_ptr, NORM: tl.constexpr,
           ZERO_CENTERED: tl.constexpr, GATED_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_SPLITS: tl.constexpr):
    """h at columns in_cols (x's dtype): x, rms_norm(x) (NORM), or the GDN output norm (GATED_NORM)."""
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
    return h


@triton.jit
def _word_dots(w, h0, h1, h2, h3, ASM: tl.constexpr):
    """[BLOCK_N, BLOCK_G] group dot products of a word tile [BLOCK_N, BLOCK_G, 8] with h in its four byte
    lanes (hk [BLOCK_G, 8] = h at columns 4j + k), fp32."""
    f0, f1, f2, f3 = _word_floats(w, ASM)
    part = f0 * h0[None, :, :] + f1 * h1[None, :, :] + f2 * h2[None, :, :] + f3 * h3[None, :, :]
    return tl.sum(part, axis=2)


@triton.jit
def _group_dots(a, w, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, QUANT: tl.constexpr, BY_BITS: tl.constexpr):
    """[BLOCK_G, BLOCK_N] per-group dot products of the weight tile [BLOCK_N, BLOCK_G, 32] (int8 values,
    exact in a's 16-bit type, or dense) with a (row j = h on group j's columns), on the tensor cores."""
    wq = tl.reshape(_to_float(w, QUANT, BY_BITS).to(a.dtype), [BLOCK_N, BLOCK_G * _GROUP])
    return tl.dot(a, tl.trans(wq))


@triton.jit
def _finish(y, rows, row_ok, res_ptr, y_ptr, conv_ptr, conv_w_ptr, conv_channels, RESIDUAL: tl.constexpr,
            CONV: tl.constexpr, TAPS: tl.constexpr, TAPS_BLOCK: tl.constexpr):
    """The epilogue of fp32 y for `rows`: + residual, or the causal conv on conv rows; stores y."""
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
    gate z [Hv * Dv] and the norm weight [Dv]."""

    output: torch.Tensor
    sumsq: torch.Tensor
    gate: torch.Tensor
    weight: torch.Tensor
    eps: float
    head_dim: int


Config = tuple  # BLOCK_N, BLOCK_G, num_warps, int8 -> fp32 by bits (else I2F)[, SPLIT_K (1)]

SPLIT_ROWS = 4096  # GEMVs of at most this many rows (and no SwiGLU / conv epilogue) may split K
MAX_SPLIT = 8
# int8 -> fp32 in the GEMV loop: 1 = integer add (the default), 2 = byte permutes (inline PTX, CUDA only:
# Triton's interpreter runs no PTX); both exact. LMBUNDLE_GEMV_CONVERT=prmt selects 2.
CONVERT = 2 if os.environ.get("LMBUNDLE_GEMV_CONVERT") == "prmt" and os.environ.get("TRITON_INTERPRET") != "1" else 1
USE_SPLIT = False  # pick_config splits K of GEMVs with few rows (measured slower on the H200; benchmarks flip it)
MMA = os.environ.get("LMBUNDLE_GEMV_MMA", "0") == "1"  # tensor-core group dots for wide GEMVs
MMA_ROWS = 4096
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline PTX there
# int8 GEMVs stream int32 words (4 weights each, converted by byte permutes) with LMBUNDLE_GEMV_WORDS=1
WORDS = os.environ.get("LMBUNDLE_GEMV_WORDS", "0") == "1"


def pick_config(out_features: int, in_features: int, normed: bool = False, swiglu: bool = False,
                dtype: torch.dtype = torch.bfloat16) -> Config:
    """Block sizes by shape, from sweeps on an H100 at Qwen3.5-2B shapes (benchmarks/RESULTS.md).

    Plain GEMVs (`bench_int8_gemv.py --sweep`): 8 rows a program; up to 2048 rows 64 groups a step with
    8 warps keep enough bytes in flight from the few programs, above 32 groups with 4 warps.
    With a norm prologue (`sweep_step_kernels.py`) every program re-reads x (and the norm weight),
    so programs take 16 rows, 32 for SwiGLU and the head: 8224x2048 in_proj 10.9 -> 9.2 us, gate/up
    16.7 -> 14.6, head 249 -> 215, out_proj with the gated norm 6.3 -> 5.0. The same picks were the
    best on the H200 (2026-11-28). Split-K (USE_SPLIT) lost there on every 2048-row GEMV (out_proj
    4.7 -> 5.2 us, down 6.6 -> 7.9, o_proj 3.3 -> 4.5 at its best split): off by default.
    MMA (tensor-core group dots, 16-bit activations) for GEMVs above MMA_ROWS rows."""
    groups = triton.next_power_of_2(in_features // GROUP)
    if MMA and out_features > MMA_ROWS and dtype in (torch.bfloat16, torch.float16) and in_features % 512 == 0:
        return (64 if out_features > 65536 else 32), 16, 4, True, 1, True
    if USE_SPLIT and out_features <= 2048 and not swiglu and in_features // GROUP >= 64:
        return 8, 32, 4, True, min(4, in_features // GROUP // 32)
    if not normed:
        few_rows = out_features <= 2048
        return 8, min(64 if few_rows else 32, groups), 8 if few_rows else 4, True
    block_n = 32 if swiglu or out_features > 65536 else 16
    block_g = 64 if out_features <= 2048 else 16 if block_n == 32 or out_features > 8192 else 32
    return block_n, min(block_g, groups), 8 if block_g == 64 else 4, True


_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials [MAX_SPLIT * SPLIT_ROWS] and int32 arrival counters (zero between calls), one pair per
    device shared by every split GEMV: calls on one stream run one after another (with PDL a kernel touches
    them only after waiting on its predecessor), and each row block's last split zeroes its counter.
    Allocated on first use (outside graph capture: the engine warms a step up before capturing it)."""
    if device not in _scratch:
        _scratch[device] = (torch.empty(MAX_SPLIT * SPLIT_ROWS, dtype=torch.float32, device=device),
                            torch.zeros(SPLIT_ROWS, dtype=torch.int32, device=device))
    return _scratch[device]


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
    block_n, block_g, num_warps, by_bits, *rest = config or pick_config(out_features, in_features, normed,
                                                                       weight2 is not None, x.dtype)
    split_k = min(rest[0] if rest else 1, MAX_SPLIT)
    mma = bool(rest[1]) if len(rest) > 1 else False
    mma = mma and x.dtype in (torch.bfloat16, torch.float16) and block_g == 16 and block_n >= 16 and (
        scales is not None or weight.dtype == x.dtype)
    words = by_bits and WORDS and scales is not None and not mma and weight.is_contiguous()
    if words:  # the same bytes as int32 words (4 columns each)
        weight = weight.view(torch.int32)
        weight2 = None if weight2 is None else weight2.view(torch.int32)
    num_groups = in_features // GROUP
    if split_k > 1 and (weight2 is not None or conv is not None or out_features > SPLIT_ROWS
                        or triton.cdiv(out_features, block_n) > SPLIT_ROWS):
        split_k = 1
    split_groups = triton.cdiv(triton.cdiv(num_groups, split_k), block_g) * block_g
    split_k = triton.cdiv(num_groups, split_groups)  # no empty splits
    parts, counts = split_scratch(x.device) if split_k > 1 else (x, x)
    norm_weight, eps, zero_centered = norm or (x, 0.0, False)
    if gated_norm is not None:
        norm_weight, eps = gated_norm.weight, gated_norm.eps
    conv_state, conv_weight = conv or (x, x)
    taps = conv_weight.shape[-1] if conv is not None else 2
    _gemv_kernel[(triton.cdiv(out_features, block_n), split_k)](
        x, norm_weight, eps, x if residual is None else residual, weight, weight if scales is None else scales,
        weight if weight2 is None else weight2, weight if scales2 is None else scales2, y,
        out_features, num_groups, conv_state, conv_weight, conv_state.shape[0] if conv else 0,
        gated_norm.gate if gated_norm else x, gated_norm.sumsq if gated_norm else x, parts, counts, split_groups,
        BLOCK_N=block_n, BLOCK_G=block_g, QUANT=scales is not None, SWIGLU=weight2 is not None,
        NORM=norm is not None, ZERO_CENTERED=zero_centered, NORM_BLOCK=triton.next_power_of_2(in_features),
        GATED_NORM=gated_norm is not None, HEAD_DIM=gated_norm.head_dim if gated_norm else 1,
        HEAD_SPLITS=gated_norm.sumsq.shape[-1] if gated_norm else 1,
        RESIDUAL=residual is not None, CONV=conv is not None, TAPS=taps, TAPS_BLOCK=triton.next_power_of_2(taps),
        SPLIT_K=split_k, PDL=pdl, BY_BITS=(CONVERT if by_bits else 0), MMA=mma, WORDS=words, ASM=not INTERPRET,
        num_warps=num_warps, launch_pdl=pdl,
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
