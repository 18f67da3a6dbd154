"""The decode step's fused kernels: `StepOps` whose one-token calls run Triton kernels.

Per layer a decode step becomes five launches (six for attention): input norm + projections (+ the GDN
causal conv), the mixer (delta rule, or flash-decoding attention with its combine), output projection
(+ the GDN gated norm) + residual, post norm + SwiGLU, down projection + residual. Short int8 matmuls
(1..4 rows: small prefill chunks) take the plain GEMV. A prompt chunk's norms run one program a token
(`triton_rows.rms_norm_rows`), and its mixers are the kernels of `triton_chunks.py` around the projections:
the GDN's conv and inputs, WY chunks walked in one kernel a layer (prepared in one when short) and output
norm; attention's k/v into the cache and one pass over it. Anything else (layouts the kernels do not take)
falls back to the reference composition of `models/ops.py`, which the tests compare these with.
"""

from __future__ import annotations

import functools

import torch

from lmbundle.models.layers import gated_delta_chunk, gdn_mix, wy_chunks
from lmbundle.models.linear import DenseCopies, Linear
from lmbundle.models.ops import AttentionWeights, GDNWeights, Norm, Rope, StepOps

from . import triton_chunks, triton_gemv, triton_mixers, whole_tiles
from .triton_rows import rms_norm_rows

# prompt chunks up to this many tokens prepare their WY chunks in one kernel; longer ones in the reference's
# batched torch ops (H200, 2B int8hu, whole chunk: 5.43 against 5.76 ms at 256 tokens, 8.81 against 8.60 at
# 512, 16.3 against 14.8 at 1,024; `benchmarks/profile_step.py --wy-variants`)
WY_PREPARE_MAX = 256


def _weights(linear: Linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, scales) in a layout the GEMV streams (int8 block-32 or dense 16-bit), else None."""
    if linear.quantized:
        if linear.scales.shape[1] * triton_gemv.GROUP != linear.in_features or not linear.qweight.is_contiguous():
            return None
        return linear.qweight, linear.scales
    weight = linear.weight
    ok = weight.dtype in (torch.bfloat16, torch.float16) and linear.in_features % triton_gemv.GROUP == 0
    return (weight, None) if ok and weight.is_contiguous() else None


class TritonStepOps(StepOps):
    def __init__(self, pdl: bool, devices: tuple[str, ...] = ("cuda",), wy_prepare_max: int = WY_PREPARE_MAX,
                 kept: DenseCopies | None = None):
        self.pdl = pdl  # programmatic dependent launch (Hopper and newer)
        self.kept = kept  # int8 weights kept expanded for prompt chunks' matmuls, where memory allows
        self.devices = devices  # ("cpu",) runs the kernels in Triton's interpreter (tests)
        # prompt chunks: the GDN's WY chunks walked in one kernel a layer (`triton_chunks.wy_recurrence`),
        # over chunks of 32 (what fits the walk's registers; the reference's 128 only saved launches of the
        # walk this replaces), and prepared by one kernel a layer too (`triton_chunks.wy_chunks`) in prompt
        # chunks of at most `wy_prepare_max` tokens (None: the reference's torch walk)
        self.wy_chunk = 32
        self.wy_prepare_max = wy_prepare_max

    def _on_device(self, x: torch.Tensor) -> bool:
        return x.device.type in self.devices

    def _one_token(self, x: torch.Tensor) -> bool:
        return self._on_device(x) and x.dim() == 2 and x.shape[0] == 1

    def _tokens(self, x: torch.Tensor) -> bool:
        """A prompt chunk's rows [S > 1, hidden], which the rows kernels normalize one program a token."""
        return self._on_device(x) and x.dim() == 2 and x.shape[0] > 1 and x.is_contiguous()

    def _short_int8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
        """1..4 rows of x, block-32 scales, contiguous: the plain GEMV streams it."""
        in_features = qweight.shape[1]
        return (self._on_device(x) and 0 < x.numel() <= triton_gemv.MAX_ROWS * in_features
                and scales.shape[1] * triton_gemv.GROUP == in_features
                and qweight.is_contiguous() and scales.is_contiguous())

    def int8_matmul(self, x, qweight, scales):
        """1..4 rows: the GEMV. Longer chunks: the weight's dense copy when one is kept (`kept`), else on CUDA
        one Triton pass dequantizes the weight (the reference's bits, one launch instead of three and half the
        traffic); then cuBLAS on the tensor cores."""
        if self._short_int8(x, qweight, scales):
            return triton_gemv.int8_gemv(x, qweight, scales)
        kept = self.kept.get(qweight, x.dtype) if self.kept is not None and self._on_device(x) else None
        if kept is not None:  # 1.19 of a 128-token chunk's 4.67 ms went to expanding (2B int8hu, H200)
            return torch.nn.functional.linear(x, kept)
        if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and qweight.is_contiguous()
                and scales.is_contiguous() and scales.shape[1] * triton_gemv.GROUP == qweight.shape[1]):
            return torch.nn.functional.linear(x, triton_gemv.dequantize(qweight, scales, x.dtype))
        return super().int8_matmul(x, qweight, scales)

    def swiglu(self, h, gate, up):
        """Both int8 and short: one pass over both weights (rounded once), else two matmuls."""
        if (gate.quantized and up.quantized and self._short_int8(h, gate.qweight, gate.scales)
                and self._short_int8(h, up.qweight, up.scales)):
            return triton_gemv.int8_swiglu(h, gate.qweight, gate.scales, up.qweight, up.scales)
        return super().swiglu(h, gate, up)

    def norm_linears(self, x: torch.Tensor, norm: Norm, linears: list[Linear]):
        if self._tokens(x):
            h = rms_norm_rows(x, norm)
            return tuple(self.linear(h, w) for w in linears)
        weights = _weights(linears[0]) if len(linears) == 1 and self._one_token(x) else None
        if weights is None:
            return super().norm_linears(x, norm, linears)
        return (triton_gemv.gemv(x, *weights, norm=norm, pdl=self.pdl).view(1, -1),)

    def norm_swiglu(self, x: torch.Tensor, norm: Norm, gate: Linear, up: Linear):
        if self._tokens(x):
            return self.swiglu(rms_norm_rows(x, norm), gate, up)
        gate_weights, up_weights = _weights(gate), _weights(up)
        if not self._one_token(x) or gate_weights is None or up_weights is None or (
                (gate_weights[1] is None) != (up_weights[1] is None)):
            return super().norm_swiglu(x, norm, gate, up)
        return triton_gemv.gemv(x, *gate_weights, *up_weights, norm=norm, pdl=self.pdl).view(1, -1)

    def linear_residual(self, h, w: Linear, residual: torch.Tensor):
        weights = _weights(w)
        if isinstance(h, triton_gemv.GatedNormInput):  # from gdn_mixer, which checked the weights
            return triton_gemv.gemv(h.output, *weights, gated_norm=h, residual=residual.reshape(-1),
                                    pdl=self.pdl).view(1, -1)
        if weights is None or not self._one_token(h):
            return super().linear_residual(h, w, residual)
        return triton_gemv.gemv(h, *weights, residual=residual.reshape(-1), pdl=self.pdl).view(1, -1)

    def gdn_mixer(self, x: torch.Tensor, norm: Norm, w: GDNWeights, conv_state: torch.Tensor,
                  rec_state: torch.Tensor, valid: torch.Tensor | None = None):
        """One token: two launches, norm + the fused projections + causal conv, then the delta rule; the
        output norm waits for out_proj (a `GatedNormInput`). A prompt chunk: norm, projections, then the
        kernels of `triton_chunks`: conv + the delta rule's inputs, its WY chunks walked (and when short,
        prepared), the output norm; projections not fused or heads it does not tile take the reference
        composition with the WY kernels."""
        dims = w.dims
        if self.wy_chunk and self._on_device(x) and x.shape[0] > 1 and rec_state.dim() == 3:  # a prompt chunk
            projected = self.norm_linears(x, norm, w.in_proj)
            prepare = triton_chunks.wy_chunks if x.shape[0] <= self.wy_prepare_max else wy_chunks
            if len(projected) > 1 or not whole_tiles(dims.key_dim, dims.value_dim):
                delta_chunk = functools.partial(gated_delta_chunk, chunk=self.wy_chunk, prepare=prepare,
                                                recurrence=triton_chunks.wy_recurrence)
                return gdn_mix(projected, w.conv, w.A_log, w.dt_bias, w.norm, dims, conv_state, rec_state, valid,
                               delta_chunk=delta_chunk)
            projected = projected[0]
            heads, head_dims = (dims.key_heads, dims.value_heads), (dims.key_dim, dims.value_dim)
            inputs = triton_chunks.gdn_inputs(projected, conv_state, w.conv, w.A_log, w.dt_bias, heads, head_dims,
                                              valid)
            walked = triton_chunks.wy_recurrence(prepare(*inputs, self.wy_chunk), rec_state)
            z = projected[:, dims.conv_dim : dims.conv_dim + dims.value_heads * dims.value_dim]
            return triton_chunks.gated_norm_chunk(walked, z, w.norm, dims.eps)
        in_weights = _weights(w.in_proj[0]) if len(w.in_proj) == 1 else None
        if (not self._one_token(x) or in_weights is None or _weights(w.out_proj) is None
                or not whole_tiles(dims.key_dim, dims.value_dim)):
            return super().gdn_mixer(x, norm, w, conv_state, rec_state, valid)
        hv, dv = dims.value_heads, dims.value_dim
        projected = triton_gemv.gemv(x, *in_weights, norm=norm, conv=(conv_state, w.conv), pdl=self.pdl)
        o, sumsq = triton_mixers.gated_delta_step(
            projected, w.A_log, w.dt_bias, rec_state, (dims.key_heads, hv), (dims.key_dim, dv), pdl=self.pdl)
        gate = projected[dims.conv_dim : dims.conv_dim + hv * dv]
        return triton_gemv.GatedNormInput(o, sumsq, gate, w.norm, dims.eps, dv)

    def prompt_attention_by_position(self, w: AttentionWeights, key_cache: torch.Tensor) -> bool:
        """The chunk kernel's layouts: it stops each token at its own position, so kv_len only bounds it."""
        return (self._on_device(key_cache) and len(w.in_proj) == 1 and whole_tiles(w.dims.head_dim)
                and key_cache.dim() == 3 and key_cache.is_contiguous())

    def attention_mixer(self, x: torch.Tensor, norm: Norm, w: AttentionWeights, rope: Rope,
                        key_cache: torch.Tensor, value_cache: torch.Tensor):
        """One token: norm + the fused projections, then flash-decoding attention (a split and a combine
        kernel). A prompt chunk: norm, projections, then its k/v into the cache and its attention over it
        (`triton_chunks.attention_chunk`, two launches where the reference takes ~50)."""
        dims = w.dims
        if (self._tokens(x) and self.prompt_attention_by_position(w, key_cache) and rope.positions.dim() == 1
                and rope.cos.dim() == 2):
            projected = self.norm_linears(x, norm, w.in_proj)[0]
            return triton_chunks.attention_chunk(
                projected, rope.positions, w.q_norm, w.k_norm, rope.cos, rope.sin, key_cache, value_cache,
                rope.kv_len, (dims.heads, dims.kv_heads), dims.head_dim, dims.output_gate, dims.zero_centered,
                dims.eps)
        weights = _weights(w.in_proj[0]) if len(w.in_proj) == 1 else None
        if not self._one_token(x) or weights is None or not whole_tiles(dims.head_dim):
            return super().attention_mixer(x, norm, w, rope, key_cache, value_cache)
        projected = triton_gemv.gemv(x, *weights, norm=norm, pdl=self.pdl)
        o = triton_mixers.attention_step(
            projected, rope.positions, w.q_norm, w.k_norm, rope.cos, rope.sin, key_cache, value_cache,
            (dims.heads, dims.kv_heads), dims.head_dim, dims.output_gate, dims.zero_centered, dims.eps,
            pdl=self.pdl,
        )
        return o.view(1, -1)
