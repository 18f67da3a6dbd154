"""Triton kernels for the core of the two mixers in a one-token decode step (the reference is
`layers.gdn_mix` and `layers.gated_attention`, which `StepOps.gdn_mixer` / `attention_mixer` run;
tests/test_step_kernels.py holds the kernels to them).

- `gated_delta_step`: per key head (and the value heads that share it) and block of value columns,
  L2-normed q/k, the decay and write strength, the delta-rule update of the fp32 state, and the
  read-out. The causal conv before it runs in the projection GEMV's epilogue and the gated RMSNorm
  after it in the out_proj GEMV's prologue (triton_gemv), which see whole channels and whole heads.
- `attention_step`: q/k RMSNorm + (M-)RoPE from precomputed cos/sin, the new k/v written to the cache,
  and attention over the cache in splits of the context (flash-decoding), GQA heads of one KV head
  sharing the key/value loads; `_attention_combine_kernel` merges the splits and applies the output gate.

With PDL the state and weights are loaded before waiting on the projection kernel (see triton_gemv).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_and_log_decay(b, a, dt_bias, a_log):
    """The GDN's write strength sigmoid(b) (rounded to b's dtype, as the reference rounds it) and log decay
    -exp(A_log) softplus(a + dt_bias), in fp32, from a head's b, a and parameters as loaded."""
    beta = tl.sigmoid(b.to(tl.float32)).to(b.dtype).to(tl.float32)
    a = a.to(tl.float32) + dt_bias.to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
    return beta, -tl.exp(a_log.to(tl.float32)) * softplus


@triton.jit
def _delta_rule_heads(proj_ptr, state_ptrs, state, a_log_ptr, dt_bias_ptr, out_ptr, sumsq_ptr, key_head, block,
                      blocks, dv, HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """One key head's delta-rule step for value columns `dv`: its L2-normed q/k, then each value head that
    shares it (the first one's `state` already loaded, the others' at `state_ptrs + r * DK * DV`): decay,
    write strength, update (stored), read-out (rounded, stored) and the read-out's sum of squares."""
    ratio: tl.constexpr = HV // HK
    key_dim: tl.constexpr = HK * DK
    b_ptr = proj_ptr + 2 * key_dim + 2 * HV * DV
    dk = tl.arange(0, DK)
    q = tl.load(proj_ptr + key_head * DK + dk).to(tl.float32)
    k = tl.load(proj_ptr + key_dim + key_head * DK + dk).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * (1.0 / tl.sqrt(DK * 1.0))
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    for r in tl.static_range(ratio):
        head = key_head * ratio + r
        if r > 0:
            state = tl.load(state_ptrs + r * DK * DV)
        v = tl.load(proj_ptr + 2 * key_dim + head * DV + dv).to(tl.float32)
        b = tl.load(b_ptr + head)
        beta, log_decay = _write_and_log_decay(b, tl.load(b_ptr + HV + head), tl.load(dt_bias_ptr + head),
                                               tl.load(a_log_ptr + head))
        decay = tl.exp(log_decay)

        state = state * decay
        memory = tl.sum(k[:, None] * state, axis=0)
        state = state + k[:, None] * (beta * (v - memory))[None, :]
        tl.store(state_ptrs + r * DK * DV, state)
        o = tl.sum(q[:, None] * state, axis=0).to(b.dtype)
        tl.store(out_ptr + head * DV + dv, o)
        o = o.to(tl.float32)
        tl.store(sumsq_ptr + head * blocks + block, tl.sum(o * o, axis=0))


@triton.jit
def _gated_delta_kernel(proj_ptr, a_log_ptr, dt_bias_ptr, rec_ptr, out_ptr, sumsq_ptr,
                        HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                        PDL: tl.constexpr):
    """Program (key head, value block): q/k of the key head and the value heads sharing it, for value
    columns [block * BV, +BV). proj holds the convolved, activated q/k/v (the projection GEMV's conv
    epilogue), then z, b, a. Writes o (rounded) and its per-block sums of squares for the output norm."""
    key_head = tl.program_id(0)
    block = tl.program_id(1)
    ratio: tl.constexpr = HV // HK
    dk = tl.arange(0, DK)
    dv = block * BV + tl.arange(0, BV)
    state_ptrs = rec_ptr + key_head * ratio * DK * DV + dk[:, None] * DV + dv[None, :]
    state = tl.load(state_ptrs)  # the first value head's state, before waiting on the projections
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    _delta_rule_heads(proj_ptr, state_ptrs, state, a_log_ptr, dt_bias_ptr, out_ptr, sumsq_ptr, key_head, block,
                      tl.num_programs(1), dv, HK, HV, DK, DV)


def gated_delta_step(projected: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, rec_state: torch.Tensor,
                     heads: tuple[int, int], dims: tuple[int, int], pdl: bool = False,
                     block_v: int = 16, num_warps: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """projected [conv'd qkv | z | b | a] (one token) -> (o [Hv * Dv] before the output norm, its sums of
    squares [Hv, Dv / block_v]); rec_state [Hv, Dk, Dv] (fp32) is updated in place. 16 value columns
    with 2 warps a program (128 programs at the 2B's 16 x 128 x 128 state) measured fastest: 2.2 us vs
    10.4 us for one program a head (`sweep_step_kernels.py`, H100)."""
    (hk, hv), (dk, dv) = heads, dims
    block_v = min(block_v, dv)
    out = torch.empty(hv * dv, dtype=projected.dtype, device=projected.device)
    sumsq = torch.empty(hv, dv // block_v, dtype=torch.float32, device=projected.device)
    _gated_delta_kernel[(hk, dv // block_v)](
        projected.reshape(-1), a_log, dt_bias, rec_state, out, sumsq, HK=hk, HV=hv, DK=dk, DV=dv, BV=block_v,
        PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
    return out, sumsq


@triton.jit
def _norm_rope(x_ptr, norm_ptr, cos_ptr, sin_ptr, eps, dims, D: tl.constexpr, ROT: tl.constexpr,
               ZERO_CENTERED: tl.constexpr):
    """RMSNorm then rotate-half RoPE of the first ROT dims, for rows [R, D] at x_ptr + offsets `dims`
    (a [R, D] offset tile whose last axis is 0..D-1); fp32 out, rounded like the reference (bf16 steps)."""
    d = tl.arange(0, D)[None, :]
    half: tl.constexpr = ROT // 2
    partner = tl.where(d < half, d + half, tl.where(d < ROT, d - half, d))
    x = tl.load(x_ptr + dims)
    dtype = x.dtype
    x = x.to(tl.float32)
    xp = tl.load(x_ptr + dims - d + partner).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.load(norm_ptr + d).to(tl.float32)
    wp = tl.load(norm_ptr + partner).to(tl.float32)
    if ZERO_CENTERED:
        x = (x * rstd * (1.0 + w)).to(dtype).to(tl.float32)
        xp = (xp * rstd * (1.0 + wp)).to(dtype).to(tl.float32)
    else:
        x = (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xp = (wp * (xp * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    rot = d < ROT
    cos = tl.load(cos_ptr + d, mask=rot, other=1.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + d, mask=rot, other=0.0).to(dtype).to(tl.float32)
    sign = tl.where(d < half, -1.0, 1.0)
    return tl.where(rot, x * cos + sign * xp * sin, x)


@triton.jit
def _softmax_block(q, key_ptr, value_ptr, slots, held, visible, m, total, acc, D: tl.constexpr,
                   PRECISION: tl.constexpr, ROUND_P: tl.constexpr, NATIVE: tl.constexpr = False):
    """One block of cache slots [N] (rows of [capacity, D] at key/value_ptr; `held` [N] are loaded) in an
    online softmax of q [M, D]: scores where `visible` [M, N], then the running (max [M], sum [M],
    acc [M, D]) updated. q is fp32 and the dots take fp32 operands, or with NATIVE q and the cache stay in
    the cache's dtype (exact products of 16-bit values, half the bytes through shared memory) and the
    probabilities are rounded to it, as the reference rounds them. ROUND_P rounds the probabilities to
    the values' dtype before an fp32 product, as the reference does for prompt chunks."""
    d = tl.arange(0, D)
    keys = tl.load(key_ptr + slots[:, None] * D + d[None, :], mask=held[:, None], other=0.0)
    if not NATIVE:
        keys = keys.to(tl.float32)
    scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * (1.0 / tl.sqrt(D * 1.0))
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    p = tl.exp(scores - m_new[:, None])
    correction = tl.exp(m - m_new)
    values = tl.load(value_ptr + slots[:, None] * D + d[None, :], mask=held[:, None], other=0.0)
    if NATIVE:
        acc = acc * correction[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
    else:
        weights = p.to(values.dtype).to(tl.float32) if ROUND_P else p
        acc = acc * correction[:, None] + tl.dot(weights, values.to(tl.float32), input_precision=PRECISION)
    return m_new, total * correction + tl.sum(p, axis=1), acc


@triton.jit
def _attend_split(proj_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, key_ptr, value_ptr, part_ptr, eps, cache,
                  position, start, split_len, kv_head, split, splits,
                  H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, GATE: tl.constexpr,
                  ZERO_CENTERED: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_L: tl.constexpr,
                  NATIVE: tl.constexpr = False):
    """One split of one token's attention (the split holds slots [start, +split_len), start <= position):
    the new k/v written where the split holds the position, then the GQA group's q (normed, rotated)
    against the visible keys, online softmax; writes (acc[D], max, sum) per head to part [H, splits, D + 2].
    `cache` is the offset of the kv head's rows [capacity, D] in key/value_ptr."""
    group: tl.constexpr = H // KVH
    q_width: tl.constexpr = D * (2 if GATE else 1)
    g = tl.arange(0, GROUP_BLOCK)
    d = tl.arange(0, D)
    heads = kv_head * group + g
    head_ok = g < group
    if position < start + split_len:  # this split holds the new token: write its k/v first
        k_dims = H * q_width + kv_head * D + d[None, :]
        k = _norm_rope(proj_ptr, k_norm_ptr, cos_ptr, sin_ptr, eps, k_dims, D, ROT, ZERO_CENTERED)
        v = tl.load(proj_ptr + H * q_width + KVH * D + kv_head * D + d)
        tl.store(key_ptr + cache + position * D + d[None, :], k.to(v.dtype))
        tl.store(value_ptr + cache + position * D + d, v)
        tl.debug_barrier()
    q_dims = tl.where(head_ok[:, None], heads[:, None], 0) * q_width + d[None, :]
    q = _norm_rope(proj_ptr, q_norm_ptr, cos_ptr, sin_ptr, eps, q_dims, D, ROT, ZERO_CENTERED)
    # dots in fp32 operands (tf32 on the tensor cores): exact for the bf16/fp16 q, keys and values; NATIVE:
    # in the cache's dtype (`_softmax_block`)
    q = tl.where(head_ok[:, None], q, 0.0).to(key_ptr.dtype.element_ty)
    if not NATIVE:
        q = q.to(tl.float32)
    m = tl.full([GROUP_BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_BLOCK], tl.float32)
    acc = tl.zeros([GROUP_BLOCK, D], tl.float32)
    end = tl.minimum(start + split_len, position + 1)
    for block in range(start, end, BLOCK_L):
        slots = block + tl.arange(0, BLOCK_L)
        visible = slots < end
        m, total, acc = _softmax_block(q, key_ptr + cache, value_ptr + cache, slots, visible, visible[None, :],
                                       m, total, acc, D, "tf32", False, NATIVE)
    part = part_ptr + (heads[:, None] * splits + split) * (D + 2)
    tl.store(part + d[None, :], acc, mask=head_ok[:, None])
    tl.store(part + D + tl.zeros_like(g)[:, None], m[:, None], mask=head_ok[:, None])
    tl.store(part + D + 1 + tl.zeros_like(g)[:, None], total[:, None], mask=head_ok[:, None])


@triton.jit
def _attention_split_kernel(proj_ptr, position_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, key_ptr, value_ptr,
                            part_ptr, eps, capacity, split_len,
                            H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                            GATE: tl.constexpr, ZERO_CENTERED: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                            BLOCK_L: tl.constexpr, PDL: tl.constexpr):
    """Program (kv head, split): the GQA group's q against cache slots [split * split_len, +split_len) up to
    the position; writes (max, sum, acc[D]) per head to part [H, splits, D + 2]."""
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    position = tl.load(position_ptr)
    start = split * split_len
    if start <= position:
        _attend_split(proj_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, key_ptr, value_ptr, part_ptr, eps,
                      kv_head * capacity * D, position, start, split_len, kv_head, split, tl.num_programs(1),
                      H, KVH, D, ROT, GATE, ZERO_CENTERED, GROUP_BLOCK, BLOCK_L)


@triton.jit
def _combine_splits(parts, gate_ptr, out_ptr, used, D: tl.constexpr, GATE: tl.constexpr,
                    SPLITS_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """One head's output from its `used` splits' softmax pieces (parts [splits, D + 2]); times
    sigmoid(gate) for a gated head (gate_ptr: its D gate values)."""
    s = tl.arange(0, SPLITS_BLOCK)
    m_all = tl.max(tl.load(parts + s * (D + 2) + D, mask=s < used, other=float("-inf")), axis=0)
    d = tl.arange(0, D)
    c = tl.arange(0, CHUNK)
    acc = tl.zeros([D], tl.float32)
    total = 0.0
    for first in range(0, used, CHUNK):
        ok = first + c < used
        part = parts + (first + c) * (D + 2)
        weight = tl.where(ok, tl.exp(tl.load(part + D, mask=ok, other=0.0) - m_all), 0.0)
        total += tl.sum(tl.load(part + D + 1, mask=ok, other=0.0) * weight, axis=0)
        acc += tl.sum(tl.load(part[:, None] + d[None, :], mask=ok[:, None], other=0.0) * weight[:, None], axis=0)
    o = acc / total
    if GATE:
        gate = tl.load(gate_ptr + d)
        o = o.to(gate.dtype).to(tl.float32) * tl.sigmoid(gate.to(tl.float32)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + d, o)


@triton.jit
def _attention_combine_kernel(part_ptr, proj_ptr, position_ptr, out_ptr, split_len, splits,
                              D: tl.constexpr, GATE: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
                              CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Program head: merge the used splits' softmax pieces; times sigmoid(gate) for a gated head."""
    head = tl.program_id(0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    used = tl.load(position_ptr) // split_len + 1
    _combine_splits(part_ptr + head * splits * (D + 2), proj_ptr + head * 2 * D + D, out_ptr + head * D, used,
                    D, GATE, SPLITS_BLOCK, CHUNK)


def attention_step(projected: torch.Tensor, position: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   heads: tuple[int, int], head_dim: int, gate: bool, zero_centered: bool, eps: float,
                   pdl: bool = False) -> torch.Tensor:
    """projected [q(+gate) | k | v] (one token at device `position`) -> attention output [H * D] (gated);
    key/value_cache [KVH, capacity, D] get the token's k/v."""
    h, kvh = heads
    capacity = key_cache.shape[1]
    split_len = max(64, triton.next_power_of_2(triton.cdiv(capacity, 128)))  # at most 128 splits
    splits = triton.cdiv(capacity, split_len)
    parts = torch.empty(h, splits, head_dim + 2, dtype=torch.float32, device=projected.device)
    out = torch.empty(h * head_dim, dtype=projected.dtype, device=projected.device)
    rot = cos.shape[-1]
    _attention_split_kernel[(kvh, splits)](
        projected.reshape(-1), position, q_norm, k_norm, cos.reshape(-1), sin.reshape(-1), key_cache, value_cache,
        parts, eps, capacity, split_len, H=h, KVH=kvh, D=head_dim, ROT=rot, GATE=gate, ZERO_CENTERED=zero_centered,
        GROUP_BLOCK=max(16, triton.next_power_of_2(h // kvh)), BLOCK_L=64 if head_dim <= 128 else 32, PDL=pdl,
        num_warps=4 if head_dim <= 128 else 8, launch_pdl=pdl,
    )
    _attention_combine_kernel[(h,)](
        parts, projected.reshape(-1), position, out, split_len, splits, D=head_dim, GATE=gate,
        SPLITS_BLOCK=triton.next_power_of_2(splits), CHUNK=8, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return out
