"""The groups of layers that a backend may run as one kernel each.

The graph calls these instead of composing the layers inline. The defaults here are the reference
compositions of `layers.py`, so the CPU backend, the gates and the Core AI exporter trace exactly the
layer math; the CUDA backend swaps in fused decode kernels (`engine/kernels/step_ops.py`) that are
tested against these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .layers import rms_norm
from .linear import Linear, swiglu

if TYPE_CHECKING:
    from .qwen35 import GatedAttention, GatedDeltaNet


class StepOps:
    def norm_linears(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, zero_centered: bool,
                     linears: list[Linear]) -> tuple[torch.Tensor, ...]:
        """The linears applied to rms_norm(x): the input norm and projections of a mixer, or the head."""
        h = rms_norm(x, norm_weight, eps, zero_centered)
        return tuple(linear(h) for linear in linears)

    def norm_swiglu(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, zero_centered: bool,
                    gate: Linear, up: Linear) -> torch.Tensor:
        """The MLP's first half: silu(gate(h)) * up(h) with h = rms_norm(x)."""
        return swiglu(rms_norm(x, norm_weight, eps, zero_centered), gate, up)

    def linear_residual(self, h: torch.Tensor, linear: Linear, residual: torch.Tensor) -> torch.Tensor:
        """residual + linear(h): a mixer's output projection or the MLP's down projection."""
        return residual + linear(h)

    def gated_delta(self, layer: "GatedDeltaNet", x: torch.Tensor, norm_weight: torch.Tensor,
                    conv_state: torch.Tensor, rec_state: torch.Tensor) -> torch.Tensor:
        """A GDN mixer from the residual stream to its gated-normed output (what out_proj reads; a
        backend may return its own handle here, which only its `linear_residual` takes)."""
        projected = self.norm_linears(x, norm_weight, layer.cfg.rms_norm_eps, True, layer.projections())
        return layer.mix(projected, conv_state, rec_state)

    def attention(self, layer: "GatedAttention", x: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, positions: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  kv_len: int) -> torch.Tensor:
        """An attention mixer from the residual stream to its (gated) output, what o_proj reads."""
        projected = self.norm_linears(x, norm_weight, layer.cfg.rms_norm_eps, layer.zero_centered,
                                      layer.projections())
        return layer.attend(projected, cos, sin, positions, key_cache, value_cache, kv_len)


REFERENCE = StepOps()
