"""The step graph's ops: the groups of layers that a backend may run as one kernel each.

The graph's modules call these with tensors and weights. `StepOps` is the reference: the layer math of
`layers.py`, composed, with int8 linears dequantized before the matmul. A backend gives the model its
own ops object (`model.ops`): the CUDA backend's fused Triton decode kernels (`engine/kernels/triton_ops.py`,
tested against these), the Core AI exporter's int8 blockwise constants. Nothing else is swapped, and
nothing is chosen through process globals.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .layers import AttentionDims, GDNDims, gated_attention, gdn_mix, rms_norm
from .linear import Linear, int8_matmul


class Norm(NamedTuple):
    """An RMSNorm's weight and variant (Qwen3.5 scales by 1 + w, Qwen3-VL by w)."""

    weight: torch.Tensor
    eps: float
    zero_centered: bool


class Rope(NamedTuple):
    """Where the step's tokens sit: rotary tables, KV-cache slots and the attention window."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor  # [S] sequence positions = KV-cache slots
    kv_len: int  # slots attended over (>= last position + 1; later slots are masked)
    valid: torch.Tensor | None = None  # [1]: the chunk's first `valid` tokens are real, the rest padding


class GDNWeights(NamedTuple):
    in_proj: list[Linear]  # qkv, z, b, a, or the four fused
    conv: torch.Tensor  # [conv_dim, K]
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    norm: torch.Tensor  # the gated output norm's weight
    out_proj: Linear  # applied by `linear_residual`; a fused mixer checks it can take the handoff
    dims: GDNDims


class AttentionWeights(NamedTuple):
    in_proj: list[Linear]  # q, k, v, or the three fused
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    dims: AttentionDims


class StepOps:
    """The reference compositions (CPU, gates, Core AI export)."""

    def int8_matmul(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, qweight, scales)

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        return self.int8_matmul(x, w.qweight, w.scales) if w.quantized else F.linear(x, w.weight)

    def swiglu(self, h: torch.Tensor, gate: Linear, up: Linear) -> torch.Tensor:
        return F.silu(self.linear(h, gate)) * self.linear(h, up)

    def norm_linears(self, x: torch.Tensor, norm: Norm, linears: list[Linear]) -> tuple[torch.Tensor, ...]:
        """The linears applied to rms_norm(x): a mixer's input norm and projections, or the head."""
        h = rms_norm(x, *norm)
        return tuple(self.linear(h, w) for w in linears)

    def norm_swiglu(self, x: torch.Tensor, norm: Norm, gate: Linear, up: Linear) -> torch.Tensor:
        """The MLP's first half: silu(gate(h)) * up(h) with h = rms_norm(x)."""
        return self.swiglu(rms_norm(x, *norm), gate, up)

    def linear_residual(self, h: torch.Tensor, w: Linear, residual: torch.Tensor) -> torch.Tensor:
        """residual + w(h): a mixer's output projection or the MLP's down projection."""
        return residual + self.linear(h, w)

    def prompt_attention_by_position(self, w: AttentionWeights, key_cache: torch.Tensor) -> bool:
        """Whether a prompt chunk's attention reads only the cache slots up to each token's position, so that
        its kv_len changes no bit of the result. The reference's softmax spans the kv_len slots: no."""
        return False

    def gdn_mixer(self, x: torch.Tensor, norm: Norm, w: GDNWeights, conv_state: torch.Tensor,
                  rec_state: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """A GDN mixer from the residual stream to its gated-normed output, what out_proj reads (a fused
        backend may return its own handle here, which only its `linear_residual` takes). `valid`: a
        padded chunk's real token count (`gdn_mix`)."""
        projected = self.norm_linears(x, norm, w.in_proj)
        return gdn_mix(projected, w.conv, w.A_log, w.dt_bias, w.norm, w.dims, conv_state, rec_state, valid)

    def attention_mixer(self, x: torch.Tensor, norm: Norm, w: AttentionWeights, rope: Rope,
                        key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        """An attention mixer from the residual stream to its (gated) output, what o_proj reads."""
        projected = self.norm_linears(x, norm, w.in_proj)
        return gated_attention(projected, w.q_norm, w.k_norm, w.dims, rope.cos, rope.sin, rope.positions,
                               key_cache, value_cache, rope.kv_len)


REFERENCE = StepOps()
