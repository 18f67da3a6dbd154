"""The batched decode step's kernels on CUDA: `RowStepOps`, the ops of `step_rows` (the scheduler's default).

x is [R, hidden]: one token of each of R sequences, row i with its own state row and position. The
continuous-batching scheduler always steps the same R rows (its capacity; rows past the live ones step
free slots), so every kernel here runs the same configuration at any load, and each row's result is
computed without reading the other rows': a sequence's logits are bit-identical whatever else runs.

The linears: with R rows a weight read serves R tokens. Two ways, chosen when the ops are made:
`int8_linears` reads int8 weights as int8 (`triton_rows_linear.py`: half the bytes of a 16-bit copy,
with the residual add and SwiGLU in its epilogue), else cuBLAS on 16-bit copies of the weights made once
(`BatchOps`, given as `linears`, which also takes what the int8 kernel does not: dense weights, over 64
rows). Triton does what lies between the GEMMs, one launch each, where the reference takes ten to forty:
- `rms_norm_rows`: a layer's input norm (and the final norm before the head), per row.
- `conv_silu_rows`: the GDN causal conv + SiLU on the qkv columns of the projections, in place, per row.
- `gated_delta_rows`: the delta rule with a row axis (per-row recurrent state [R, Hv, Dk, Dv]); each
  row's state is read and written once a layer (the step's largest traffic after the weights: 1 MB a row
  and layer for the 2B).
- `gated_norm_rows`: the GDN output norm (per head, times silu(z)) that out_proj reads.
- `attention_rows`: q/k norm + RoPE, k/v written at each row's own position of its own cache row
  [R, KVH, L, D], flash-decoding over that row's prefix only (splits past its position exit at once),
  in splits long enough to stream (the rows give the parallelism one token lacks).
Block sizes come from `rows_tuning.py`. With `pdl` every kernel here is a programmatic dependent launch
(Hopper): it starts while its predecessor drains and waits for it (`gdc_wait`) before touching anything
that one wrote, the delta rule after loading its state, which no kernel before it in the step writes.

Rows flagged dead in `live` (the padding rows) skip the mixers' state and cache traffic, the part of the
step that scales with rows. Shapes the kernels do not take fall back to the reference composition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmbundle.models.layers import rms_norm
from lmbundle.models.linear import Linear
from lmbundle.models.ops import AttentionWeights, GDNWeights, Norm, Rope, StepOps

from . import interpreted, rows_tuning, triton_rows_linear, whole_tiles
from .triton_gemv import GatedNormInput, _conv_silu
from .triton_mixers import _attend_split, _combine_splits, _delta_rule_heads


@triton.jit
def _wait_for_predecessor(PDL: tl.constexpr):
    """With PDL: wait until the kernel before has finished (its writes visible), then let the next start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _rms_norm_rows_kernel(x_ptr, w_ptr, y_ptr, n, eps, ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr = False):
    """Program (row): `layers.rms_norm` of the row, with its roundings (to x's dtype after the scale)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    _wait_for_predecessor(PDL)
    ok = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=ok, other=0.0)
    x32 = x.to(tl.float32)
    normed = x32 * tl.rsqrt(tl.sum(x32 * x32, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        y = normed * (1.0 + w)
    else:
        y = w * normed.to(x.dtype).to(tl.float32)
    tl.store(y_ptr + row * n + cols, y.to(x.dtype), mask=ok)


def rms_norm_rows(x: torch.Tensor, norm: Norm, num_warps: int | None = None, pdl: bool = False) -> torch.Tensor:
    rows, n = x.shape
    y = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _rms_norm_rows_kernel[(rows,)](x, norm.weight, y, n, norm.eps, ZERO_CENTERED=norm.zero_centered, BLOCK=block,
                                   PDL=pdl, num_warps=num_warps or min(16, max(4, block // 512)), launch_pdl=pdl)
    return y


@triton.jit
def _conv_silu_rows_kernel(proj_ptr, proj_stride, live_ptr, conv_ptr, conv_w_ptr, channels,
                           TAPS: tl.constexpr, TAPS_BLOCK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (block of channels, row): the row's new qkv through its conv state [C, TAPS - 1], in place."""
    row = tl.program_id(1)
    _wait_for_predecessor(PDL)
    if tl.load(live_ptr + row) != 0:
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = c < channels
        ptrs = proj_ptr + row.to(tl.int64) * proj_stride + c
        new = tl.load(ptrs, mask=ok, other=0.0)
        out = _conv_silu(new, conv_ptr + row.to(tl.int64) * channels * (TAPS - 1), conv_w_ptr, c, ok, TAPS,
                         TAPS_BLOCK)
        tl.store(ptrs, out.to(new.dtype), mask=ok)


def conv_silu_rows(projected: torch.Tensor, live: torch.Tensor, conv_state: torch.Tensor,
                   conv_weight: torch.Tensor, block: int = 1024, num_warps: int = 4, pdl: bool = False) -> None:
    """projected [R, conv channels | ...]: the first C columns of the live rows become conv + SiLU of
    themselves with the row's conv state [R, C, K-1], which shifts in the new inputs."""
    rows, channels, taps = projected.shape[0], conv_state.shape[1], conv_weight.shape[-1]
    _conv_silu_rows_kernel[(triton.cdiv(channels, block), rows)](
        projected, projected.stride(0), live, conv_state, conv_weight, channels, TAPS=taps,
        TAPS_BLOCK=triton.next_power_of_2(taps), BLOCK=block, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)


@triton.jit
def _gated_norm_rows_kernel(o_ptr, sumsq_ptr, gate_ptr, gate_stride, w_ptr, y_ptr, eps, HV: tl.constexpr,
                            DV: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Program (head, row): `layers.gated_rms_norm` of the head's rounded read-out, whose sum of squares
    the delta rule left in SPLITS partials, times silu(gate)."""
    head = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    _wait_for_predecessor(PDL)
    d = tl.arange(0, DV)
    offsets = (row * HV + head) * DV + d
    o = tl.load(o_ptr + offsets)
    sumsq = tl.sum(tl.load(sumsq_ptr + (row * HV + head) * SPLITS + tl.arange(0, SPLITS)), axis=0)
    normed = (o.to(tl.float32) * tl.rsqrt(sumsq / DV + eps)).to(o.dtype).to(tl.float32)
    gate = tl.load(gate_ptr + row * gate_stride + head * DV + d).to(tl.float32)
    w = tl.load(w_ptr + d).to(tl.float32)
    tl.store(y_ptr + offsets, (w * normed * (gate * tl.sigmoid(gate))).to(o.dtype))


def gated_norm_rows(h: GatedNormInput, num_warps: int = 1, pdl: bool = False) -> torch.Tensor:
    """The GDN output norm of a `gated_delta_rows` result: [R, Hv * Dv], what out_proj reads."""
    rows, heads, splits = h.sumsq.shape
    y = torch.empty_like(h.output)
    _gated_norm_rows_kernel[(heads, rows)](h.output, h.sumsq, h.gate, h.gate.stride(0), h.weight, y, h.eps,
                                          HV=heads, DV=h.head_dim, SPLITS=splits, PDL=pdl, num_warps=num_warps,
                                          launch_pdl=pdl)
    return y


@triton.jit
def _gated_delta_rows_kernel(proj_ptr, proj_stride, live_ptr, a_log_ptr, dt_bias_ptr, rec_ptr, out_ptr, sumsq_ptr,
                             HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                             BV: tl.constexpr, PDL: tl.constexpr):
    """Program (key head, value block, row): `triton_mixers._gated_delta_kernel` on the row's projections
    (conv'd q/k/v, z, b, a) and recurrent state [HV, DK, DV], whose first value head's block is loaded
    before waiting on the conv; a dead row writes zeros and keeps its state."""
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
    live = tl.load(live_ptr + row) != 0
    state_ptrs = rec_ptr + (row.to(tl.int64) * HV + key_head * ratio) * DK * DV + dk[:, None] * DV + dv[None, :]
    state = tl.load(state_ptrs, mask=live, other=0.0)
    _wait_for_predecessor(PDL)
    if live:
        _delta_rule_heads(proj, state_ptrs, state, a_log_ptr, dt_bias_ptr, out, sumsq, key_head, block, blocks, dv,
                          HK, HV, DK, DV)
    else:  # a padding row: zeros out, its state untouched
        for r in tl.static_range(ratio):
            head = key_head * ratio + r
            tl.store(out + head * DV + dv, tl.zeros([BV], out_ptr.dtype.element_ty))
            tl.store(sumsq + head * blocks + block, tl.full([], 0.0, tl.float32))


def gated_delta_rows(projected: torch.Tensor, live: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor,
                     rec_state: torch.Tensor, heads: tuple[int, int], dims: tuple[int, int],
                     block_v: int = 16, num_warps: int = 2, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """projected [R, conv'd qkv | z | b | a] -> (o [R, Hv * Dv] before the output norm, its sums of squares
    [R, Hv, Dv / block_v]); rec_state [R, Hv, Dk, Dv] (fp32) is updated in place for the live rows."""
    (hk, hv), (dk, dv) = heads, dims
    rows = projected.shape[0]
    block_v = min(block_v, dv)
    out = torch.empty(rows, hv * dv, dtype=projected.dtype, device=projected.device)
    sumsq = torch.empty(rows, hv, dv // block_v, dtype=torch.float32, device=projected.device)
    _gated_delta_rows_kernel[(hk, dv // block_v, rows)](
        projected, projected.stride(0), live, a_log, dt_bias, rec_state, out, sumsq,
        HK=hk, HV=hv, DK=dk, DV=dv, BV=block_v, PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
    return out, sumsq


@triton.jit
def _attention_rows_split_kernel(proj_ptr, proj_stride, position_ptr, live_ptr, q_norm_ptr, k_norm_ptr, cos_ptr,
                                 sin_ptr, key_ptr, value_ptr, part_ptr, eps, capacity, split_len,
                                 H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                                 GATE: tl.constexpr, ZERO_CENTERED: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                                 BLOCK_L: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr):
    """Program (kv head, split, row): `triton_mixers._attention_split_kernel` for the row's token against
    its own cache row [KVH, capacity, D], slots [split * split_len, +split_len) up to its position, the
    dots in the cache's dtype (NATIVE, off in the interpreter: `kernels.interpreted`)."""
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    splits = tl.num_programs(1)
    _wait_for_predecessor(PDL)
    position = tl.load(position_ptr + row)
    start = split * split_len
    if (start <= position) & (tl.load(live_ptr + row) != 0):
        _attend_split(proj_ptr + row.to(tl.int64) * proj_stride, q_norm_ptr, k_norm_ptr, cos_ptr + row * ROT,
                      sin_ptr + row * ROT, key_ptr, value_ptr, part_ptr + row * H * splits * (D + 2), eps,
                      (row.to(tl.int64) * KVH + kv_head) * capacity * D, position, start, split_len, kv_head, split,
                      splits, H, KVH, D, ROT, GATE, ZERO_CENTERED, GROUP_BLOCK, BLOCK_L, NATIVE)


@triton.jit
def _attention_rows_combine_kernel(part_ptr, proj_ptr, proj_stride, position_ptr, live_ptr, out_ptr, split_len,
                                   splits, H: tl.constexpr, D: tl.constexpr, GATE: tl.constexpr,
                                   SPLITS_BLOCK: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Program (head, row): merge the row's used splits; times sigmoid(gate) for a gated head."""
    head = tl.program_id(0)
    row = tl.program_id(1)
    out = out_ptr + (row * H + head) * D
    _wait_for_predecessor(PDL)
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
                   zero_centered: bool, eps: float, split_len: int = 256, block_l: int = 32, num_warps: int = 4,
                   num_stages: int = 3, pdl: bool = False) -> torch.Tensor:
    """projected [R, q(+gate) | k | v] (row i's token at positions[i]) -> attention output [R, H * D]
    (gated); key/value_cache [R, KVH, capacity, D] get each row's k/v. A program takes `split_len` slots
    (a power of two, at least block_l) of one row and kv head; a row's splits past its position exit at
    once, so its work follows its own length. Each split holding block_l-slot blocks that Triton
    pipelines in `num_stages` stages: long enough to stream, where the one-token kernel needs many short
    splits for parallelism that the rows provide here."""
    h, kvh = heads
    rows, capacity = projected.shape[0], key_cache.shape[2]
    split_len = min(max(split_len, block_l, triton.next_power_of_2(triton.cdiv(capacity, 128))),  # <= 128 splits
                    triton.next_power_of_2(capacity))
    splits = triton.cdiv(capacity, split_len)
    parts = torch.empty(rows, h, splits, head_dim + 2, dtype=torch.float32, device=projected.device)
    out = torch.empty(rows, h * head_dim, dtype=projected.dtype, device=projected.device)
    rot = cos.shape[-1]
    _attention_rows_split_kernel[(kvh, splits, rows)](
        projected, projected.stride(0), positions, live, q_norm, k_norm, cos.contiguous(), sin.contiguous(),
        key_cache, value_cache, parts, eps, capacity, split_len, H=h, KVH=kvh, D=head_dim, ROT=rot, GATE=gate,
        ZERO_CENTERED=zero_centered, GROUP_BLOCK=max(16, triton.next_power_of_2(h // kvh)), BLOCK_L=block_l,
        NATIVE=not interpreted(), PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    _attention_rows_combine_kernel[(h, rows)](
        parts, projected, projected.stride(0), positions, live, out, split_len, splits, H=h, D=head_dim, GATE=gate,
        SPLITS_BLOCK=triton.next_power_of_2(splits), CHUNK=8, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return out


class RowStepOps(StepOps):
    """The batched step's ops on CUDA for x [R, hidden] with per-row states (conv [R, C, K-1], recurrent
    [R, Hv, Dk, Dv], KV [R, KVH, L, D]): the linears through `linears` (the scheduler's `BatchOps`: cuBLAS
    on dense weights, rows padded to a fixed count), or with `int8_linears` the int8 ones through
    `triton_rows_linear` (the residual add and SwiGLU fused in); the rest the kernels above, as
    programmatic dependent launches with `pdl`. `live` [R] (int32, on the device) flags the rows that
    hold a sequence. Anything else: the reference composition."""

    def __init__(self, live: torch.Tensor, linears: StepOps, devices: tuple[str, ...] = ("cuda",),
                 int8_linears: bool = False, pdl: bool = False):
        self.live = live
        self.linears = linears
        self.devices = devices  # ("cpu",) runs the kernels in Triton's interpreter (tests)
        self.int8_linears = int8_linears
        self.pdl = pdl
        self._counters: torch.Tensor | None = None  # the int8 linears' split-K arrival counters (zeros)

    def _rows(self, x: torch.Tensor) -> bool:
        return x.device.type in self.devices and x.dim() == 2 and x.is_contiguous()

    def _normed(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        if not self._rows(x):
            return rms_norm(x, *norm)
        return rms_norm_rows(x, norm, **rows_tuning.rows_config("rms_norm_rows"), pdl=self.pdl)

    def _int8(self, x: torch.Tensor, *weights: Linear) -> bool:
        return self.int8_linears and self._rows(x) and all(triton_rows_linear.takes(x, w) for w in weights)

    def _int8_linear(self, x: torch.Tensor, w: Linear, up: Linear | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
        tiles = rows_tuning.linear_tiles(w.out_features, w.in_features, x.shape[0], up is not None)
        blocks = triton.cdiv(w.out_features, tiles.block_n)
        if self._counters is None or self._counters.numel() < blocks or self._counters.device != x.device:
            self._counters = torch.zeros(max(blocks, 4096), dtype=torch.int32, device=x.device)
        return triton_rows_linear.rows_linear(x, (w.qweight, w.scales), tiles, self._counters,
                                              up=(up.qweight, up.scales) if up is not None else None,
                                              residual=residual, pdl=self.pdl)

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        return self._int8_linear(x, w) if self._int8(x, w) else self.linears.linear(x, w)

    def norm_linears(self, x: torch.Tensor, norm: Norm, linears: list[Linear]):
        h = self._normed(x, norm)
        return tuple(self.linear(h, w) for w in linears)

    def swiglu(self, h: torch.Tensor, gate: Linear, up: Linear) -> torch.Tensor:
        return self._int8_linear(h, gate, up=up) if self._int8(h, gate, up) else super().swiglu(h, gate, up)

    def norm_swiglu(self, x: torch.Tensor, norm: Norm, gate: Linear, up: Linear):
        return self.swiglu(self._normed(x, norm), gate, up)

    def linear_residual(self, h, w: Linear, residual: torch.Tensor):
        if isinstance(h, GatedNormInput):  # from gdn_mixer
            h = gated_norm_rows(h, **rows_tuning.rows_config("gated_norm_rows"), pdl=self.pdl)
        if self._int8(h, w) and residual.shape == (h.shape[0], w.out_features) and self._rows(residual):
            return self._int8_linear(h, w, residual=residual)
        return residual + self.linear(h, w)

    def gdn_mixer(self, x: torch.Tensor, norm: Norm, w: GDNWeights, conv_state: torch.Tensor,
                  rec_state: torch.Tensor, valid: torch.Tensor | None = None):
        """Norm, the fused projections (one GEMM), conv + SiLU in place, the delta rule; the output norm
        is left to `linear_residual` (a `GatedNormInput`). A padded chunk (`valid`) is no batched step."""
        dims = w.dims
        if (not self._rows(x) or rec_state.dim() != 4 or valid is not None or len(w.in_proj) != 1
                or not whole_tiles(dims.key_dim, dims.value_dim)
                or not (conv_state.is_contiguous() and rec_state.is_contiguous())):
            return super().gdn_mixer(x, norm, w, conv_state, rec_state, valid)
        hv, dv = dims.value_heads, dims.value_dim
        projected = self.linear(self._normed(x, norm), w.in_proj[0])
        conv_silu_rows(projected, self.live, conv_state, w.conv, **rows_tuning.rows_config("conv_silu_rows"),
                       pdl=self.pdl)
        o, sumsq = gated_delta_rows(projected, self.live, w.A_log, w.dt_bias, rec_state,
                                    (dims.key_heads, hv), (dims.key_dim, dv),
                                    **rows_tuning.rows_config("gated_delta_rows"), pdl=self.pdl)
        gate = projected[:, dims.conv_dim : dims.conv_dim + hv * dv]
        return GatedNormInput(o, sumsq, gate, w.norm, dims.eps, dv)

    def attention_mixer(self, x: torch.Tensor, norm: Norm, w: AttentionWeights, rope: Rope,
                        key_cache: torch.Tensor, value_cache: torch.Tensor):
        dims = w.dims
        if (not self._rows(x) or key_cache.dim() != 4 or len(w.in_proj) != 1 or not whole_tiles(dims.head_dim)
                or not (key_cache.is_contiguous() and value_cache.is_contiguous())):
            return super().attention_mixer(x, norm, w, rope, key_cache, value_cache)
        projected = self.linear(self._normed(x, norm), w.in_proj[0])
        return attention_rows(projected, rope.positions, self.live, w.q_norm, w.k_norm, rope.cos, rope.sin,
                              key_cache, value_cache, (dims.heads, dims.kv_heads), dims.head_dim,
                              dims.output_gate, dims.zero_centered, dims.eps,
                              **rows_tuning.rows_config("attention_rows"), pdl=self.pdl)
