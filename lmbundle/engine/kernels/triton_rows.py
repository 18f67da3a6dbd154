"""The batched decode step's fused kernels: `RowStepOps`, the ops of `step_rows` on CUDA (with
LMBUNDLE_ROW_KERNELS=1 until tuned: benchmarks/RESULTS.md has them slower than the reference ops today).

x is [R, hidden]: one token of each of R sequences, row i with its own state row and position. The
continuous-batching scheduler always steps the same R rows (its capacity; rows past the live ones step
free slots), so every kernel here runs the same configuration at any load, and each row's result is
computed without reading the other rows': a sequence's logits are bit-identical whatever else runs.

- `rows_linear`: y = h @ W.T for all rows, each weight tile read once (int8 block-32 dequantized in
  registers to the activation dtype, as the reference does, or dense 16-bit), the rows padded to a
  fixed tile of 16..64 and multiplied on the tensor cores; with the one-token GEMV's fusions: RMSNorm
  (per row) or the GDN gated output norm before, SwiGLU over two weights, the residual add or the GDN
  causal conv (per row and channel) after.
- `gated_delta_rows`: the delta rule with a row axis (per-row recurrent state [R, Hv, Dk, Dv]).
- `attention_rows`: q/k norm + RoPE, k/v written at each row's own position of its own cache row
  [R, KVH, L, D], flash-decoding over that row's prefix only (splits past its position exit at once).

Rows flagged dead in `live` (the padding rows) skip the mixers' state and cache traffic, the part of the
step that scales with rows. Shapes the kernels do not take fall back to the reference composition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmbundle.models.linear import Linear
from lmbundle.models.ops import AttentionWeights, GDNWeights, Norm, Rope, StepOps

from .triton_gemv import GROUP, GatedNormInput
from .triton_mixers import _attend_split, _combine_splits, _delta_rule_heads
from .triton_ops import _power_of_two, _weights

_GROUP = tl.constexpr(GROUP)


@triton.jit
def _rows_linear_kernel(x_ptr, norm_ptr, eps, res_ptr, w_ptr, s_ptr, w2_ptr, s2_ptr, y_ptr,
                        rows, out_features, in_features,
                        conv_ptr, conv_w_ptr, conv_channels, gate_ptr, gate_stride, sumsq_ptr,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr,
                        SWIGLU: tl.constexpr, NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                        GATED_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_SPLITS: tl.constexpr,
                        RESIDUAL: tl.constexpr, CONV: tl.constexpr, TAPS: tl.constexpr, TAPS_BLOCK: tl.constexpr,
                        DOT_F32: tl.constexpr):
    """Program (block of outputs, block of rows): y[m, n] = h[m] @ W[n] where h is x, rms_norm(x) (NORM)
    or the GDN output norm of x (GATED_NORM: per-head sums of squares from `sumsq` partials, times
    silu(gate)); SWIGLU: silu(h @ W) * (h @ W2); then + res (RESIDUAL) or the causal conv + SiLU on
    outputs below conv_channels (CONV, conv state [rows, C, TAPS - 1])."""
    m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < rows, n < out_features
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + m[:, None].to(tl.int64) * in_features
    w_rows = n[:, None].to(tl.int64) * in_features
    s_rows = n[:, None].to(tl.int64) * (in_features // _GROUP)

    rstd = tl.zeros([ROWS], tl.float32)
    if NORM:
        for k0 in range(0, in_features, BLOCK_K):
            ok = m_ok[:, None] & (k0 + k < in_features)[None, :]
            xs = tl.load(x_rows + k0 + k[None, :], mask=ok, other=0.0).to(tl.float32)
            rstd += tl.sum(xs * xs, axis=1)
        rstd = tl.rsqrt(rstd / in_features + eps)

    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    acc2 = tl.zeros([ROWS, BLOCK_N], tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        cols = k0 + k
        k_ok = cols < in_features
        x_ok = m_ok[:, None] & k_ok[None, :]
        h = tl.load(x_rows + cols[None, :], mask=x_ok, other=0.0)
        if NORM:  # rms_norm's roundings: to x's dtype after the scale (and after the weight)
            nw = tl.load(norm_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            normed = h.to(tl.float32) * rstd[:, None]
            if ZERO_CENTERED:
                h = (normed * (1.0 + nw)).to(dtype)
            else:
                h = (nw * normed.to(dtype).to(tl.float32)).to(dtype)
        if GATED_NORM:  # gated_rms_norm per head of HEAD_DIM columns (BLOCK_K divides it: one head a tile)
            partial = sumsq_ptr + (m * (in_features // HEAD_DIM) + k0 // HEAD_DIM) * HEAD_SPLITS
            sumsq = tl.load(partial, mask=m_ok, other=1.0)
            for j in tl.static_range(1, HEAD_SPLITS):
                sumsq += tl.load(partial + j, mask=m_ok, other=0.0)
            rstd_head = tl.rsqrt(sumsq / HEAD_DIM + eps)[:, None]
            normed = (h.to(tl.float32) * rstd_head).to(dtype).to(tl.float32)
            gate = tl.load(gate_ptr + m[:, None] * gate_stride + cols[None, :], mask=x_ok, other=0.0).to(tl.float32)
            nw = tl.load(norm_ptr + cols % HEAD_DIM, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            h = (nw * normed * (gate * tl.sigmoid(gate))).to(dtype)
        w_ok = n_ok[:, None] & k_ok[None, :]
        w = _dequantized(w_ptr + w_rows + cols[None, :], s_ptr + s_rows + cols[None, :] // _GROUP, w_ok, dtype, QUANT)
        if DOT_F32:  # fp32 activations, or Triton's interpreter (its bf16 dots are wrong): exact fp32 products
            h = h.to(tl.float32)
        acc = _dot(h, w, acc, DOT_F32)
        if SWIGLU:
            w2 = _dequantized(w2_ptr + w_rows + cols[None, :], s2_ptr + s_rows + cols[None, :] // _GROUP, w_ok,
                              dtype, QUANT)
            acc2 = _dot(h, w2, acc2, DOT_F32)

    y = acc
    if SWIGLU:
        y = y * tl.sigmoid(y) * acc2
    out_offsets = m[:, None].to(tl.int64) * out_features + n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:  # residual + linear(h), each rounded to the stream's dtype as the reference adds them
        res = tl.load(res_ptr + out_offsets, mask=out_ok, other=0.0)
        y = res.to(tl.float32) + y.to(res.dtype).to(tl.float32)
    if CONV:
        conv_n = n < conv_channels
        y = tl.where(conv_n[None, :], _conv_silu_rows(y.to(dtype), conv_ptr, conv_w_ptr, m, n, conv_channels,
                                                      m_ok[:, None] & conv_n[None, :], TAPS, TAPS_BLOCK), y)
    tl.store(y_ptr + out_offsets, y, mask=out_ok)


@triton.jit
def _dot(h, w, acc, DOT_F32: tl.constexpr):
    """acc + h @ w.T: 16-bit operands on the tensor cores, else in fp32 without tf32 rounding."""
    if DOT_F32:
        return tl.dot(h, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(h, tl.trans(w), acc)


@triton.jit
def _dequantized(w_ptrs, s_ptrs, ok, dtype: tl.constexpr, QUANT: tl.constexpr):
    """A weight tile in the activation dtype: int8 * scale rounded once (`models.linear.dequantize`'s bits)."""
    w = tl.load(w_ptrs, mask=ok, other=0)
    if QUANT:
        scale = tl.load(s_ptrs, mask=ok, other=0.0).to(dtype).to(tl.float32)
        return (w.to(tl.float32) * scale).to(dtype)
    return w.to(dtype)


@triton.jit
def _conv_silu_rows(new, conv_ptr, conv_w_ptr, m, n, channels, ok, TAPS: tl.constexpr, TAPS_BLOCK: tl.constexpr):
    """Causal depthwise conv + SiLU of the new inputs [rows, channels] with each row's conv state
    [C, TAPS - 1] (shifted in place); fp32 out, rounded to the activation dtype like the reference."""
    taps = tl.arange(0, TAPS_BLOCK)[None, None, :]
    state = conv_ptr + (m[:, None, None].to(tl.int64) * channels + n[None, :, None]) * (TAPS - 1) + taps
    ok3 = ok[:, :, None]
    history = tl.load(state, mask=ok3 & (taps < TAPS - 1), other=0.0).to(tl.float32)
    weights = tl.load(conv_w_ptr + n[None, :, None] * TAPS + taps, mask=ok3 & (taps < TAPS), other=0.0)
    window = tl.where(taps == TAPS - 1, new[:, :, None].to(tl.float32), history)
    out = tl.sum(window * weights.to(tl.float32), axis=2)
    shifted = tl.load(state + 1, mask=ok3 & (taps < TAPS - 2), other=0.0)
    shifted = tl.where(taps == TAPS - 2, new[:, :, None], shifted)
    tl.store(state, shifted, mask=ok3 & (taps < TAPS - 1))
    return (out * tl.sigmoid(out)).to(new.dtype).to(tl.float32)


Config = tuple[int, int, int, int, int]  # ROWS, BLOCK_N, BLOCK_K, num_warps, num_stages


def pick_config(rows: int, out_features: int, in_features: int, swiglu: bool = False,
                head_dim: int | None = None) -> Config:
    """Block sizes by shape and the step's row count (the scheduler's capacity, never its load); with the
    gated norm a K tile stays within one head of `head_dim` columns. Three stages of x, weight and scale
    tiles fit the H200's shared memory up to 32 rows, two above."""
    tile_rows = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = 16 if out_features <= 4096 else 32 if swiglu else 64
    block_k = min(256, head_dim or 256, max(32, triton.next_power_of_2(in_features)))
    return tile_rows, block_n, block_k, 4, 3 if tile_rows <= 32 else 2


def rows_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
                weight2: torch.Tensor | None = None, scales2: torch.Tensor | None = None,
                norm: Norm | None = None, residual: torch.Tensor | None = None,
                conv: tuple[torch.Tensor, torch.Tensor] | None = None, gated_norm: GatedNormInput | None = None,
                config: Config | None = None) -> torch.Tensor:
    """x [R, in] -> y [R, out] in x's dtype (fp32 accumulation) for int8 `weight` + `scales` or dense; the
    fusions as `triton_gemv.gemv`'s, per row: norm, gated_norm, weight2 (SwiGLU), residual [R, out],
    conv = (conv_state [R, C, K-1], conv_weight [C, K])."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    tile_rows, block_n, block_k, num_warps, num_stages = config or pick_config(
        rows, out_features, in_features, weight2 is not None, gated_norm.head_dim if gated_norm else None)
    norm_weight, eps, zero_centered = norm or (x, 0.0, False)
    if gated_norm is not None:
        norm_weight, eps = gated_norm.weight, gated_norm.eps
    conv_state, conv_weight = conv or (x, x)
    taps = conv_weight.shape[-1] if conv is not None else 2
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows, tile_rows))
    _rows_linear_kernel[grid](
        x, norm_weight, eps, x if residual is None else residual, weight, weight if scales is None else scales,
        weight if weight2 is None else weight2, weight if scales2 is None else scales2, y,
        rows, out_features, in_features, conv_state, conv_weight, conv_state.shape[1] if conv else 0,
        gated_norm.gate if gated_norm else x, gated_norm.gate.stride(0) if gated_norm else 0,
        gated_norm.sumsq if gated_norm else x,
        ROWS=tile_rows, BLOCK_N=block_n, BLOCK_K=block_k, QUANT=scales is not None, SWIGLU=weight2 is not None,
        NORM=norm is not None, ZERO_CENTERED=zero_centered, GATED_NORM=gated_norm is not None,
        HEAD_DIM=gated_norm.head_dim if gated_norm else 1, HEAD_SPLITS=gated_norm.sumsq.shape[-1] if gated_norm else 1,
        RESIDUAL=residual is not None, CONV=conv is not None, TAPS=taps, TAPS_BLOCK=triton.next_power_of_2(taps),
        DOT_F32=x.dtype == torch.float32 or x.device.type == "cpu", num_warps=num_warps, num_stages=num_stages,
    )
    return y


@triton.jit
def _gated_delta_rows_kernel(proj_ptr, proj_stride, live_ptr, a_log_ptr, dt_bias_ptr, rec_ptr, out_ptr, sumsq_ptr,
                             HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                             BV: tl.constexpr):
    """Program (key head, value block, row): `triton_mixers._gated_delta_kernel` on the row's projections
    (conv'd q/k/v, z, b, a) and recurrent state [HV, DK, DV]; a dead row writes zeros and keeps its state."""
    key_head = tl.program_id(0)
    block = tl.program_id(1)
    row = tl.program_id(2)
    blocks = tl.num_programs(1)
    ratio: tl.constexpr = HV // HK
    proj = proj_ptr + row.to(tl.int64) * proj_stride
    out = out_ptr + row * HV * DV
    sumsq = sumsq_ptr + row * HV * blocks
    dk = tl.arange(0, DK)
    dv = block * BV + tl.arange(0, BV)
    if tl.load(live_ptr + row) == 0:  # a padding row: zeros out, its state untouched
        for r in tl.static_range(ratio):
            head = key_head * ratio + r
            tl.store(out + head * DV + dv, tl.zeros([BV], out_ptr.dtype.element_ty))
            tl.store(sumsq + head * blocks + block, tl.full([], 0.0, tl.float32))
    else:
        state_ptrs = (rec_ptr + (row.to(tl.int64) * HV + key_head * ratio) * DK * DV
                      + dk[:, None] * DV + dv[None, :])
        _delta_rule_heads(proj, state_ptrs, tl.load(state_ptrs), a_log_ptr, dt_bias_ptr, out, sumsq, key_head, block,
                          blocks, dv, HK, HV, DK, DV)


def gated_delta_rows(projected: torch.Tensor, live: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor,
                     rec_state: torch.Tensor, heads: tuple[int, int], dims: tuple[int, int],
                     block_v: int = 16, num_warps: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """projected [R, conv'd qkv | z | b | a] -> (o [R, Hv * Dv] before the output norm, its sums of squares
    [R, Hv, Dv / block_v]); rec_state [R, Hv, Dk, Dv] (fp32) is updated in place for the live rows."""
    (hk, hv), (dk, dv) = heads, dims
    rows = projected.shape[0]
    block_v = min(block_v, dv)
    out = torch.empty(rows, hv * dv, dtype=projected.dtype, device=projected.device)
    sumsq = torch.empty(rows, hv, dv // block_v, dtype=torch.float32, device=projected.device)
    _gated_delta_rows_kernel[(hk, dv // block_v, rows)](
        projected, projected.stride(0), live, a_log, dt_bias, rec_state, out, sumsq,
        HK=hk, HV=hv, DK=dk, DV=dv, BV=block_v, num_warps=num_warps,
    )
    return out, sumsq


@triton.jit
def _attention_rows_split_kernel(proj_ptr, proj_stride, position_ptr, live_ptr, q_norm_ptr, k_norm_ptr, cos_ptr,
                                 sin_ptr, key_ptr, value_ptr, part_ptr, eps, capacity, split_len,
                                 H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                                 GATE: tl.constexpr, ZERO_CENTERED: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                                 BLOCK_L: tl.constexpr):
    """Program (kv head, split, row): `triton_mixers._attention_split_kernel` for the row's token against
    its own cache row [KVH, capacity, D], slots [split * split_len, +split_len) up to its position."""
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    splits = tl.num_programs(1)
    position = tl.load(position_ptr + row)
    start = split * split_len
    if (start <= position) & (tl.load(live_ptr + row) != 0):
        _attend_split(proj_ptr + row.to(tl.int64) * proj_stride, q_norm_ptr, k_norm_ptr, cos_ptr + row * ROT,
                      sin_ptr + row * ROT, key_ptr, value_ptr, part_ptr + row * H * splits * (D + 2), eps,
                      (row.to(tl.int64) * KVH + kv_head) * capacity * D, position, start, split_len, kv_head, split,
                      splits, H, KVH, D, ROT, GATE, ZERO_CENTERED, GROUP_BLOCK, BLOCK_L)


@triton.jit
def _attention_rows_combine_kernel(part_ptr, proj_ptr, proj_stride, position_ptr, live_ptr, out_ptr, split_len,
                                   splits, H: tl.constexpr, D: tl.constexpr, GATE: tl.constexpr,
                                   SPLITS_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program (head, row): merge the row's used splits; times sigmoid(gate) for a gated head."""
    head = tl.program_id(0)
    row = tl.program_id(1)
    out = out_ptr + (row * H + head) * D
    if tl.load(live_ptr + row) == 0:
        tl.store(out + tl.arange(0, D), tl.zeros([D], out_ptr.dtype.element_ty))
    else:
        used = tl.load(position_ptr + row) // split_len + 1
        _combine_splits(part_ptr + (row * H + head) * splits * (D + 2),
                        proj_ptr + row.to(tl.int64) * proj_stride + head * 2 * D + D, out, used,
                        D, GATE, SPLITS_BLOCK, CHUNK)


def attention_rows(projected: torch.Tensor, positions: torch.Tensor, live: torch.Tensor, q_norm: torch.Tensor,
                   k_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, heads: tuple[int, int], head_dim: int, gate: bool,
                   zero_centered: bool, eps: float) -> torch.Tensor:
    """projected [R, q(+gate) | k | v] (row i's token at positions[i]) -> attention output [R, H * D]
    (gated); key/value_cache [R, KVH, capacity, D] get each row's k/v. The split length is fixed by the
    capacity; a row's splits past its position exit at once, so its work follows its own length."""
    h, kvh = heads
    rows, capacity = projected.shape[0], key_cache.shape[2]
    split_len = max(64, triton.next_power_of_2(triton.cdiv(capacity, 128)))  # at most 128 splits
    splits = triton.cdiv(capacity, split_len)
    parts = torch.empty(rows, h, splits, head_dim + 2, dtype=torch.float32, device=projected.device)
    out = torch.empty(rows, h * head_dim, dtype=projected.dtype, device=projected.device)
    rot = cos.shape[-1]
    _attention_rows_split_kernel[(kvh, splits, rows)](
        projected, projected.stride(0), positions, live, q_norm, k_norm, cos.contiguous(), sin.contiguous(),
        key_cache, value_cache, parts, eps, capacity, split_len, H=h, KVH=kvh, D=head_dim, ROT=rot, GATE=gate,
        ZERO_CENTERED=zero_centered, GROUP_BLOCK=max(16, triton.next_power_of_2(h // kvh)),
        BLOCK_L=64 if head_dim <= 128 else 32, num_warps=4 if head_dim <= 128 else 8,
    )
    _attention_rows_combine_kernel[(h, rows)](
        parts, projected, projected.stride(0), positions, live, out, split_len, splits, H=h, D=head_dim, GATE=gate,
        SPLITS_BLOCK=triton.next_power_of_2(splits), CHUNK=8, num_warps=4,
    )
    return out


class RowStepOps(StepOps):
    """The batched step's ops on CUDA: the fused rows kernels for x [R, hidden] with per-row states (conv
    [R, C, K-1], recurrent [R, Hv, Dk, Dv], KV [R, KVH, L, D]); `live` [R] (int32, on the device) flags the
    rows that hold a sequence, the rest are padding. Anything else: the reference composition."""

    def __init__(self, live: torch.Tensor, devices: tuple[str, ...] = ("cuda",)):
        self.live = live
        self.devices = devices  # ("cpu",) runs the kernels in Triton's interpreter (tests)

    def _rows(self, x: torch.Tensor) -> bool:
        return x.device.type in self.devices and x.dim() == 2 and x.is_contiguous()

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        weights = _weights(w)
        if weights is None or not self._rows(x):
            return super().linear(x, w)
        return rows_linear(x, *weights)

    def norm_linears(self, x: torch.Tensor, norm: Norm, linears: list[Linear]):
        weights = _weights(linears[0]) if len(linears) == 1 else None
        if weights is None or not self._rows(x):
            return super().norm_linears(x, norm, linears)
        return (rows_linear(x, *weights, norm=norm),)

    def norm_swiglu(self, x: torch.Tensor, norm: Norm, gate: Linear, up: Linear):
        gate_weights, up_weights = _weights(gate), _weights(up)
        if not self._rows(x) or gate_weights is None or up_weights is None or (
                (gate_weights[1] is None) != (up_weights[1] is None)):
            return super().norm_swiglu(x, norm, gate, up)
        return rows_linear(x, *gate_weights, *up_weights, norm=norm)

    def linear_residual(self, h, w: Linear, residual: torch.Tensor):
        if isinstance(h, GatedNormInput):  # from gdn_mixer, which checked the weights
            return rows_linear(h.output, *_weights(w), gated_norm=h, residual=residual)
        weights = _weights(w)
        if weights is None or not self._rows(h) or not residual.is_contiguous():
            return super().linear_residual(h, w, residual)
        return rows_linear(h, *weights, residual=residual)

    def gdn_mixer(self, x: torch.Tensor, norm: Norm, w: GDNWeights, conv_state: torch.Tensor,
                  rec_state: torch.Tensor, valid: torch.Tensor | None = None):
        """Two launches: norm + the fused projections + causal conv, then the delta rule; the output
        norm waits for out_proj (a `GatedNormInput`). A padded chunk (`valid`) is no batched step."""
        dims = w.dims
        in_weights = _weights(w.in_proj[0]) if len(w.in_proj) == 1 else None
        if (not self._rows(x) or rec_state.dim() != 4 or valid is not None or in_weights is None
                or _weights(w.out_proj) is None or not (_power_of_two(dims.key_dim) and _power_of_two(dims.value_dim))
                or not (conv_state.is_contiguous() and rec_state.is_contiguous())):
            return super().gdn_mixer(x, norm, w, conv_state, rec_state, valid)
        hv, dv = dims.value_heads, dims.value_dim
        projected = rows_linear(x, *in_weights, norm=norm, conv=(conv_state, w.conv))
        o, sumsq = gated_delta_rows(projected, self.live, w.A_log, w.dt_bias, rec_state,
                                    (dims.key_heads, hv), (dims.key_dim, dv))
        gate = projected[:, dims.conv_dim : dims.conv_dim + hv * dv]
        return GatedNormInput(o, sumsq, gate, w.norm, dims.eps, dv)

    def attention_mixer(self, x: torch.Tensor, norm: Norm, w: AttentionWeights, rope: Rope,
                        key_cache: torch.Tensor, value_cache: torch.Tensor):
        dims = w.dims
        weights = _weights(w.in_proj[0]) if len(w.in_proj) == 1 else None
        if (not self._rows(x) or key_cache.dim() != 4 or weights is None or not _power_of_two(dims.head_dim)
                or not (key_cache.is_contiguous() and value_cache.is_contiguous())):
            return super().attention_mixer(x, norm, w, rope, key_cache, value_cache)
        projected = rows_linear(x, *weights, norm=norm)
        return attention_rows(projected, rope.positions, self.live, w.q_norm, w.k_norm, rope.cos, rope.sin,
                              key_cache, value_cache, (dims.heads, dims.kv_heads), dims.head_dim,
                              dims.output_gate, dims.zero_centered, dims.eps)
