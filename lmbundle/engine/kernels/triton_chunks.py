"""Triton kernels for prompt chunks: the mixers between their projections and output projections.

Attention (`attention_chunk`): the chunk's k/v (normed, rotated) into the cache, then a flash-style pass
per block of tokens and head over the cache up to each token's position, its output gate included: two
launches where `layers.gated_attention` takes ~50 and a [KVH, G*S, L] fp32 score tensor.

The GDN: `gdn_inputs` (the causal conv, SiLU, q/k L2 norms, write strengths and decays: about thirty torch
kernels a layer in `layers.gdn_mix`, two launches here) and `gated_norm_chunk` (the output norm, one launch)
surround the chunked (WY) delta rule, which comes in two parts.

`layers.gated_delta_chunk` does each chunk's parallel part as batched torch ops over all heads and
chunks (`wy_chunks`: cumulative decay, the strictly lower A, the triangular solve, the WY products), then
walks the chunks in order (`wy_recurrence`): four small matmuls a chunk. On the H200 a 2,048-token prompt
of the 2B spent 10.2 ms of its 47.8 ms in those walks, 1,152 matmul launches of fp32 FFMA, and most of
the ~17 ms of small elementwise kernels around them
(`benchmarks/results/20261201T233000Z-profile-prefill.txt`). Here each part is one launch per layer:
- `wy_chunks`: three programs per (head, chunk of 2 x 16 tokens): the keys' part, the values' part (each
  with (I + A)^-1 blockwise, each half's diagonal block by forward substitution in registers) and the
  queries' part.
- `wy_recurrence`: a program per (head, 16 value columns) keeps its slice of the state in registers
  across all the chunks.
Products on the tensor cores as three TF32 products (`tf32x3`: about fp32's accuracy; the reference's
matmuls are fp32). Compiled offline for sm_90 (`python -m tests.kernels_compile --resources`), chunks of
32: the walk (one stage, 4 warps) takes 16 KB of shared memory, 255 registers and 56 bytes of spills
(chunks of 64, or fp32 FMA products, spilled 0.2-5.7 KB); the preparation (8 warps) 20 KB and 1.24 KB
of spills (2.36 KB as one program a chunk). On the H200 (2B int8hu, `benchmarks/profile_step.py
--wy-variants`) a 2,048-token chunk takes 40.2 ms with the walk against 49.7 in torch ops; the preparation
is faster than the torch ops up to 256 tokens (4.06 against 4.97 ms at 128, 5.43 against 5.76 at 256) and
slower past them (8.81 against 8.60 at 512, 16.3 against 14.8 at 1,024), so `TritonStepOps` walks every
prompt chunk here and prepares only short ones (`triton_ops.WY_PREPARE_MAX`).
These and the input norms as rows kernels make a prompt chunk of the 2B int8hu 820 launches at 128 tokens
instead of 2,050 in torch ops (6.39 against 9.42 ms on the H200; 29.8 against 40.0 ms at 2,048 tokens).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmbundle.models.layers import WYChunks
from lmbundle.models.layers import wy_chunks as reference_chunks
from lmbundle.models.layers import wy_recurrence as reference_recurrence

from . import whole_tiles
from .triton_mixers import _norm_rope, _softmax_block, _write_and_log_decay


@triton.jit
def _unit_lower_inverse(a, B: tl.constexpr):
    """(I + a)^-1 of a strictly lower [B, B] tile by forward substitution: row r is e_r minus a[r] times
    the rows above it, which are final by then."""
    i = tl.arange(0, B)
    inverse = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    for r in range(1, B):
        a_row = tl.sum(tl.where(i[:, None] == r, a, 0.0), axis=0)
        inverse = tl.where(i[:, None] == r, inverse - tl.sum(a_row[:, None] * inverse, axis=0)[None, :], inverse)
    return inverse


@triton.jit
def _half(ptr, token, real, head, H: tl.constexpr, D: tl.constexpr):
    d = tl.arange(0, D)
    return tl.load(ptr + (token[:, None] * H + head) * D + d[None, :], mask=real[:, None], other=0.0)


@triton.jit
def _store_half(ptr, first_row, value, B: tl.constexpr, D: tl.constexpr):
    """value [B, D] into rows first_row.. of a [rows, D] tensor (one 64-bit base, 32-bit offsets)."""
    tl.store(ptr + first_row * D + tl.arange(0, B)[:, None] * D + tl.arange(0, D)[None, :], value)


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _wy_chunks_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, seq, wv_ptr, wk_ptr, qd_ptr, scores_ptr, ke_ptr,
                      decay_ptr, H: tl.constexpr, B: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """Program (head, chunk of 2B tokens, part): `layers.wy_chunks` for one head, in two halves of B tokens
    (tokens past `seq` are padding: no decay, no write). (I + A)^-1 blockwise: each half's diagonal
    block inverted by forward substitution, the block below from those two (-T11 A10 T00). Three programs
    share a chunk (part 0 the keys' products, 1 the values', 2 the queries' part, which needs no inverse):
    3x the programs of a short prompt, and a third of the tiles live in each (half the register spills)."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    part = tl.program_id(2)
    i = tl.arange(0, B)
    t0 = chunk * 2 * B + i
    t1 = t0 + B
    real0, real1 = t0 < seq, t1 < seq
    k0, k1 = _half(k_ptr, t0, real0, head, H, DK), _half(k_ptr, t1, real1, head, H, DK)
    g0 = tl.load(g_ptr + t0 * H + head, mask=real0, other=0.0)
    g1 = tl.load(g_ptr + t1 * H + head, mask=real1, other=0.0)

    cum0 = tl.cumsum(g0, axis=0)  # G_t
    cum1 = tl.cumsum(g1, axis=0) + tl.sum(g0, axis=0)
    lower = i[:, None] >= i[None, :]
    r00 = tl.exp(tl.where(lower, cum0[:, None] - cum0[None, :], float("-inf")))  # e^{G_t - G_s}, s <= t
    r11 = tl.exp(tl.where(lower, cum1[:, None] - cum1[None, :], float("-inf")))
    r10 = tl.exp(cum1[:, None] - cum0[None, :])
    row0 = (head * chunks + chunk).to(tl.int64) * 2 * B
    row1 = row0 + B

    if part != 2:  # the keys' and the values' products need the inverse
        beta0 = tl.load(beta_ptr + t0 * H + head, mask=real0, other=0.0)
        beta1 = tl.load(beta_ptr + t1 * H + head, mask=real1, other=0.0)
        strict = i[:, None] > i[None, :]
        t00 = _unit_lower_inverse(tl.where(strict, beta0[:, None] * r00 * _dot(k0, tl.trans(k0)), 0.0), B)
        t11 = _unit_lower_inverse(tl.where(strict, beta1[:, None] * r11 * _dot(k1, tl.trans(k1)), 0.0), B)
        t10 = -_dot(_dot(t11, beta1[:, None] * r10 * _dot(k1, tl.trans(k0))), t00)
        if part != 0:
            v0, v1 = _half(v_ptr, t0, real0, head, H, DV), _half(v_ptr, t1, real1, head, H, DV)
            bv0, bv1 = beta0[:, None] * v0, beta1[:, None] * v1
            _store_half(wv_ptr, row0, _dot(t00, bv0), B, DV)
            _store_half(wv_ptr, row1, _dot(t10, bv0) + _dot(t11, bv1), B, DV)
        if part != 1:
            bk0, bk1 = (beta0 * tl.exp(cum0))[:, None] * k0, (beta1 * tl.exp(cum1))[:, None] * k1
            _store_half(wk_ptr, row0, _dot(t00, bk0), B, DK)
            _store_half(wk_ptr, row1, _dot(t10, bk0) + _dot(t11, bk1), B, DK)
            last = tl.sum(tl.where(i == B - 1, cum1, 0.0), axis=0)  # G at the chunk's end
            _store_half(ke_ptr, row0, k0 * tl.exp(last - cum0)[:, None], B, DK)
            _store_half(ke_ptr, row1, k1 * tl.exp(last - cum1)[:, None], B, DK)
            tl.store(decay_ptr + head * chunks + chunk, tl.exp(last))
    else:  # the queries' part
        q0, q1 = _half(q_ptr, t0, real0, head, H, DK), _half(q_ptr, t1, real1, head, H, DK)
        _store_half(qd_ptr, row0, q0 * tl.exp(cum0)[:, None], B, DK)
        _store_half(qd_ptr, row1, q1 * tl.exp(cum1)[:, None], B, DK)
        # scores [2B, 2B]: the upper-right block is zero (no token sees a later one)
        scores0 = scores_ptr + row0 * 2 * B + i[:, None] * 2 * B + i[None, :]
        scores1 = scores0 + B * 2 * B
        tl.store(scores0, _dot(q0, tl.trans(k0)) * r00)
        tl.store(scores0 + B, tl.zeros([B, B], tl.float32))
        tl.store(scores1, _dot(q1, tl.trans(k0)) * r10)
        tl.store(scores1 + B, _dot(q1, tl.trans(k1)) * r11)


@triton.jit
def _wy_recurrence_kernel(wv_ptr, wk_ptr, qd_ptr, scores_ptr, ke_ptr, decay_ptr, state_ptr, out_ptr, chunks,
                          C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """Program (head, block of BV value columns): for each chunk, U = w_v - w_k S; out = q_decayed S +
    scores U; S = e^{G_C} S + k_to_end^T U. S [DK, BV] stays in registers; stored once at the end. The
    head's chunks are read through block pointers (no per-element offsets held in registers)."""
    head = tl.program_id(0)
    col = tl.program_id(1) * BV
    rows = chunks * C
    by_key = head.to(tl.int64) * rows * DK
    by_value = head.to(tl.int64) * rows * DV

    wk = tl.make_block_ptr(wk_ptr + by_key, (rows, DK), (DK, 1), (0, 0), (C, DK), (1, 0))
    qd = tl.make_block_ptr(qd_ptr + by_key, (rows, DK), (DK, 1), (0, 0), (C, DK), (1, 0))
    ke = tl.make_block_ptr(ke_ptr + by_key, (rows, DK), (DK, 1), (0, 0), (C, DK), (1, 0))
    wv = tl.make_block_ptr(wv_ptr + by_value, (rows, DV), (DV, 1), (0, col), (C, BV), (1, 0))
    out = tl.make_block_ptr(out_ptr + by_value, (rows, DV), (DV, 1), (0, col), (C, BV), (1, 0))
    scores = tl.make_block_ptr(scores_ptr + head.to(tl.int64) * rows * C, (rows, C), (C, 1), (0, 0), (C, C), (1, 0))
    state = tl.make_block_ptr(state_ptr + head.to(tl.int64) * DK * DV, (DK, DV), (DV, 1), (0, col), (DK, BV), (1, 0))
    s = tl.load(state)
    for c in range(chunks):
        u = tl.load(wv) - tl.dot(tl.load(wk), s, input_precision="tf32x3")
        o = tl.dot(tl.load(qd), s, input_precision="tf32x3")
        o = tl.dot(tl.load(scores), u, o, input_precision="tf32x3")
        tl.store(out, o)
        s = s * tl.load(decay_ptr + head * chunks + c)
        s = tl.dot(tl.trans(tl.load(ke)), u, s, input_precision="tf32x3")
        wk = tl.advance(wk, (C, 0))
        qd = tl.advance(qd, (C, 0))
        ke = tl.advance(ke, (C, 0))
        scores = tl.advance(scores, (C, 0))
        wv = tl.advance(wv, (C, 0))
        out = tl.advance(out, (C, 0))
    tl.store(state, s)


def wy_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              chunk: int) -> WYChunks:
    """`layers.wy_chunks` as one launch (q,k [S, H, Dk], v [S, H, Dv], g, beta [S, H], fp32); shapes the
    kernel does not tile take the reference."""
    seq, heads, dk = k.shape
    dv = v.shape[-1]
    if not (whole_tiles(chunk, dk, dv) and chunk >= 32):  # two halves of at least 16 tokens
        return reference_chunks(q, k, v, g, beta, chunk)
    n = triton.cdiv(seq, chunk)
    device = q.device
    out = WYChunks(*(torch.empty(heads, n, chunk, width, dtype=torch.float32, device=device)
                     for width in (dv, dk, dk, chunk, dk)), torch.empty(heads, n, dtype=torch.float32, device=device))
    q, k, v, g, beta = (x.float().contiguous() for x in (q, k, v, g, beta))
    _wy_chunks_kernel[(heads, n, 3)](q, k, v, g, beta, seq, *out, H=heads, B=chunk // 2, DK=dk, DV=dv, num_warps=8)
    return out


def wy_recurrence(chunks: WYChunks, state: torch.Tensor, block_v: int = 16) -> torch.Tensor:
    """`layers.wy_recurrence` as one launch: state [H, Dk, Dv] (fp32) updated in place; returns
    [H, N, C, Dv]. Shapes the kernel does not tile (dims not powers of two of at least 16) take the
    reference."""
    heads, n, chunk, dk = chunks.w_k.shape
    dv = chunks.w_v.shape[-1]
    if not (whole_tiles(chunk, dk, dv) and state.dtype == torch.float32 and state.is_contiguous()):
        return reference_recurrence(chunks, state)
    block_v = min(block_v, dv)
    out = torch.empty(heads, n, chunk, dv, dtype=torch.float32, device=state.device)
    w_v, w_k, q_decayed, scores, k_to_end, decay = (x.float().contiguous() for x in chunks)
    _wy_recurrence_kernel[(heads, dv // block_v)](w_v, w_k, q_decayed, scores, k_to_end, decay, state, out, n,
                                                  C=chunk, DK=dk, DV=dv, BV=block_v, num_warps=4, num_stages=1)
    return out


@triton.jit
def _gdn_inputs_kernel(proj_ptr, proj_stride, conv_ptr, conv_w_ptr, a_log_ptr, dt_bias_ptr, valid_ptr, seq,
                       q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr,
                       DV: tl.constexpr, BLOCK: tl.constexpr, HV_BLOCK: tl.constexpr, TAPS: tl.constexpr,
                       TAPS_BLOCK: tl.constexpr, HAS_VALID: tl.constexpr):
    """Program (token t, slot): slots 0..2HK-1 are the q and k heads, then the HV value heads (causal conv
    over the token's window, SiLU rounded to the activation dtype; q/k L2-normed, q scaled, both repeated
    to the value heads); the last slot is the token's write strengths and decays for all value heads,
    zero past the chunk's `valid` real tokens."""
    t = tl.program_id(0)
    slot = tl.program_id(1)
    ratio: tl.constexpr = HV // HK
    key_dim: tl.constexpr = HK * DK
    conv_dim: tl.constexpr = 2 * key_dim + HV * DV
    row = proj_ptr + t.to(tl.int64) * proj_stride
    dtype = proj_ptr.dtype.element_ty
    if slot < 2 * HK + HV:
        is_key = slot < 2 * HK
        first = tl.where(is_key, slot * DK, 2 * key_dim + (slot - 2 * HK) * DV)
        width = tl.where(is_key, DK, DV)
        d = tl.arange(0, BLOCK)
        ok = d < width
        c = first + d
        taps = tl.arange(0, TAPS_BLOCK)[None, :]
        source = t + taps - (TAPS - 1)  # the token each tap reads; before the chunk, the conv state
        tap_ok = ok[:, None] & (taps < TAPS)
        new = tl.load(proj_ptr + source.to(tl.int64) * proj_stride + c[:, None], mask=tap_ok & (source >= 0),
                      other=0.0).to(tl.float32)
        old = tl.load(conv_ptr + c[:, None] * (TAPS - 1) + t + taps, mask=tap_ok & (source < 0),
                      other=0.0).to(tl.float32)
        weights = tl.load(conv_w_ptr + c[:, None] * TAPS + taps, mask=tap_ok, other=0.0).to(tl.float32)
        x = tl.sum((new + old) * weights, axis=1)
        x = (x * tl.sigmoid(x)).to(dtype).to(tl.float32)
        if is_key:
            x = x * tl.rsqrt(tl.sum(x * x, axis=0) + 1e-6)
            out = k_ptr
            if slot < HK:
                x = x * (1.0 / tl.sqrt(DK * 1.0))
                out = q_ptr
            head = slot % HK
            for r in tl.static_range(ratio):
                tl.store(out + (t * HV + head * ratio + r).to(tl.int64) * DK + d, x, mask=ok)
        else:
            tl.store(v_ptr + (t * HV + slot - 2 * HK).to(tl.int64) * DV + d, x, mask=ok)
    else:
        h = tl.arange(0, HV_BLOCK)
        head_ok = h < HV
        real_tokens = seq
        if HAS_VALID:
            real_tokens = tl.load(valid_ptr)
        real = t < real_tokens
        beta, g = _write_and_log_decay(tl.load(row + conv_dim + HV * DV + h, mask=head_ok, other=0.0),
                                       tl.load(row + conv_dim + HV * DV + HV + h, mask=head_ok, other=0.0),
                                       tl.load(dt_bias_ptr + h, mask=head_ok, other=0.0),
                                       tl.load(a_log_ptr + h, mask=head_ok, other=0.0))
        tl.store(beta_ptr + t * HV + h, tl.where(real, beta, 0.0), mask=head_ok)
        tl.store(g_ptr + t * HV + h, tl.where(real, g, 0.0), mask=head_ok)


@triton.jit
def _conv_state_kernel(proj_ptr, proj_stride, conv_ptr, valid_ptr, seq, channels, TAPS: tl.constexpr,
                       TAPS_BLOCK: tl.constexpr, BLOCK: tl.constexpr, HAS_VALID: tl.constexpr):
    """Program (block of channels): the conv state becomes the last TAPS - 1 real inputs of the window
    (old state, then the chunk's tokens), all loaded before any is stored."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = c < channels
    taps = tl.arange(0, TAPS_BLOCK)[None, :]
    real_tokens = seq
    if HAS_VALID:
        real_tokens = tl.load(valid_ptr)
    window_row = real_tokens + taps  # rows of [state; chunk] after the real tokens' first: the last K-1 real
    source = window_row - (TAPS - 1)
    keep = ok[:, None] & (taps < TAPS - 1)
    new = tl.load(proj_ptr + source.to(tl.int64) * proj_stride + c[:, None], mask=keep & (source >= 0), other=0.0)
    old = tl.load(conv_ptr + c[:, None] * (TAPS - 1) + window_row, mask=keep & (source < 0), other=0.0)
    tl.store(conv_ptr + c[:, None] * (TAPS - 1) + taps, tl.where(source >= 0, new.to(old.dtype), old), mask=keep)


def gdn_inputs(projected: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, a_log: torch.Tensor,
               dt_bias: torch.Tensor, heads: tuple[int, int], dims: tuple[int, int], valid: torch.Tensor | None):
    """What `layers.gdn_mix` hands the chunked delta rule, in two launches: q, k [S, Hv, Dk], v [S, Hv, Dv],
    g, beta [S, Hv] (fp32) from the fused projections [S, conv | z | b | a] of a prompt chunk whose first
    `valid` ([1], int; None: all) tokens are real; conv_state [C, K-1] moves past them in place."""
    (hk, hv), (dk, dv) = heads, dims
    seq = projected.shape[0]
    taps = conv_weight.shape[-1]
    device = projected.device
    q, k = (torch.empty(seq, hv, dk, dtype=torch.float32, device=device) for _ in range(2))
    v = torch.empty(seq, hv, dv, dtype=torch.float32, device=device)
    g, beta = (torch.empty(seq, hv, dtype=torch.float32, device=device) for _ in range(2))
    taps_block = triton.next_power_of_2(taps)
    _gdn_inputs_kernel[(seq, 2 * hk + hv + 1)](
        projected, projected.stride(0), conv_state, conv_weight, a_log, dt_bias, valid, seq, q, k, v, g, beta,
        HK=hk, HV=hv, DK=dk, DV=dv, BLOCK=triton.next_power_of_2(max(dk, dv)), HV_BLOCK=triton.next_power_of_2(hv),
        TAPS=taps, TAPS_BLOCK=taps_block, HAS_VALID=valid is not None, num_warps=4)
    channels = conv_state.shape[0]
    _conv_state_kernel[(triton.cdiv(channels, 256),)](projected, projected.stride(0), conv_state, valid, seq,
                                                       channels, TAPS=taps, TAPS_BLOCK=taps_block, BLOCK=256,
                                                       HAS_VALID=valid is not None, num_warps=4)
    return q, k, v, g, beta


@triton.jit
def _gated_norm_chunk_kernel(o_ptr, rows, gate_ptr, gate_stride, w_ptr, y_ptr, eps, HV: tl.constexpr,
                             DV: tl.constexpr):
    """Program (token, value head): `layers.gated_rms_norm` of the head's read-out (the walk's fp32 [HV,
    rows, DV], rounded to the activation dtype first, as the reference rounds it) times silu(z)."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, DV)
    dtype = y_ptr.dtype.element_ty
    o = tl.load(o_ptr + (head * rows + t) * DV + d).to(dtype).to(tl.float32)
    normed = (o * tl.rsqrt(tl.sum(o * o, axis=0) / DV + eps)).to(dtype).to(tl.float32)
    gate = tl.load(gate_ptr + t * gate_stride + head * DV + d).to(tl.float32)
    w = tl.load(w_ptr + d).to(tl.float32)
    tl.store(y_ptr + (t * HV + head) * DV + d, (w * normed * (gate * tl.sigmoid(gate))).to(dtype))


def gated_norm_chunk(walked: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GDN output norm of a prompt chunk: walked [Hv, N, C, Dv] (`wy_recurrence`, fp32), gate = z [S, Hv * Dv]
    (a view of the projections) -> [S, Hv * Dv] in z's dtype, what out_proj reads."""
    heads, n, chunk, dv = walked.shape
    seq = gate.shape[0]
    y = torch.empty(seq, heads * dv, dtype=gate.dtype, device=gate.device)
    _gated_norm_chunk_kernel[(seq, heads)](walked, n * chunk, gate, gate.stride(0), weight, y, eps, HV=heads, DV=dv,
                                           num_warps=1)
    return y


@triton.jit
def _chunk_kv_kernel(proj_ptr, proj_stride, positions_ptr, k_norm_ptr, cos_ptr, sin_ptr, key_ptr, value_ptr, eps,
                     capacity, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                     GATE: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    """Program (token, kv head): the token's k (normed, rotated) and v into the caches [KVH, capacity, D]
    at its position."""
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_width: tl.constexpr = D * (2 if GATE else 1)
    d = tl.arange(0, D)
    row = proj_ptr + t.to(tl.int64) * proj_stride
    k = _norm_rope(row, k_norm_ptr, cos_ptr + t * ROT, sin_ptr + t * ROT, eps, (H * q_width + kv_head * D + d)[None, :],
                   D, ROT, ZERO_CENTERED)
    v = tl.load(row + H * q_width + KVH * D + kv_head * D + d)
    slot = (kv_head * capacity + tl.load(positions_ptr + t)).to(tl.int64) * D
    tl.store(key_ptr + slot + d[None, :], k.to(key_ptr.dtype.element_ty))
    tl.store(value_ptr + slot + d, v.to(value_ptr.dtype.element_ty))


@triton.jit
def _chunk_attention_kernel(proj_ptr, proj_stride, positions_ptr, q_norm_ptr, cos_ptr, sin_ptr, key_ptr, value_ptr,
                            out_ptr, eps, seq, capacity, kv_len, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                            ROT: tl.constexpr, GATE: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Program (block of BLOCK_M tokens, head): their q (normed, rotated, rounded to the cache's dtype) against
    the cache's slots up to each token's position (within kv_len), online softmax, probabilities rounded to
    the values' dtype like the reference's; times sigmoid(gate) for a gated head. Products on fp32 operands:
    TF32 for 16-bit caches (exact for their values), IEEE fp32 for fp32 ones (PRECISION)."""
    head = tl.program_id(1)
    kv_head = head // (H // KVH)
    q_width: tl.constexpr = D * (2 if GATE else 1)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    real = i < seq
    rows = tl.where(real, i, 0)
    d = tl.arange(0, D)
    dims = rows[:, None].to(tl.int64) * proj_stride + head * q_width + d[None, :]
    q = _norm_rope(proj_ptr, q_norm_ptr, cos_ptr + rows[:, None] * ROT, sin_ptr + rows[:, None] * ROT, eps, dims, D,
                   ROT, ZERO_CENTERED)
    q = q.to(key_ptr.dtype.element_ty).to(tl.float32)  # fp32 operands: tf32 products are exact for 16-bit ones
    position = tl.load(positions_ptr + rows)
    end = tl.minimum(tl.max(position, axis=0) + 1, kv_len)
    cache = kv_head.to(tl.int64) * capacity * D
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, end, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        held = slots < end
        m, total, acc = _softmax_block(q, key_ptr + cache, value_ptr + cache, slots, held,
                                       held[None, :] & (slots[None, :] <= position[:, None]), m, total, acc, D,
                                       PRECISION, True)
    dtype = out_ptr.dtype.element_ty
    o = acc / total[:, None]
    if GATE:
        gate = tl.load(proj_ptr + dims + D).to(tl.float32)
        o = o.to(dtype).to(tl.float32) * tl.sigmoid(gate)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * (H * D) + head * D + d[None, :], o.to(dtype), mask=real[:, None])


def attention_chunk(projected: torch.Tensor, positions: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    kv_len: int, heads: tuple[int, int], head_dim: int, gate: bool, zero_centered: bool,
                    eps: float) -> torch.Tensor:
    """`layers.gated_attention` of a prompt chunk in two launches: projected [S, q(+gate) | k | v] at
    `positions` [S] (rotary tables cos/sin [S, rot]) -> [S, H * D]; the chunk's k/v go into key/value_cache
    [KVH, capacity, D] first, then each token attends over the cache's first kv_len slots up to its own."""
    (h, kvh), seq = heads, projected.shape[0]
    capacity = key_cache.shape[1]
    rot = cos.shape[-1]
    cos, sin = cos.contiguous(), sin.contiguous()
    flags = dict(H=h, KVH=kvh, D=head_dim, ROT=rot, GATE=gate, ZERO_CENTERED=zero_centered)
    _chunk_kv_kernel[(seq, kvh)](projected, projected.stride(0), positions, k_norm, cos, sin, key_cache, value_cache,
                                 eps, capacity, **flags, num_warps=1 if head_dim <= 64 else 2)
    out = torch.empty(seq, h * head_dim, dtype=projected.dtype, device=projected.device)
    block_m = 16 if seq <= 16 else 32
    _chunk_attention_kernel[(triton.cdiv(seq, block_m), h)](
        projected, projected.stride(0), positions, q_norm, cos, sin, key_cache, value_cache, out, eps, seq, capacity,
        kv_len, **flags, BLOCK_M=block_m, BLOCK_N=32,
        PRECISION="ieee" if key_cache.dtype == torch.float32 else "tf32", num_warps=4 if head_dim <= 128 else 8)
    return out
