"""The decode step's fused kernels on CUDA: `StepOps` whose one-token calls run Triton kernels.

Per layer a decode step becomes five launches (six for attention): input norm + projections, the mixer,
output projection + residual, post norm + SwiGLU, down projection + residual. Anything else (chunks of
several tokens, layouts the kernels do not take) falls back to the reference composition.
"""

from __future__ import annotations

import torch

from lmbundle.models.linear import Linear
from lmbundle.models.step_ops import StepOps

from . import triton_gemv, triton_mixers


def _weights(linear: Linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, scales) in a layout the GEMV streams (int8 block-32 or dense 16-bit), else None."""
    if linear.quantized:
        if linear.scales.shape[1] * triton_gemv.GROUP != linear.in_features or not linear.qweight.is_contiguous():
            return None
        return linear.qweight, linear.scales
    weight = linear.weight
    ok = weight.dtype in (torch.bfloat16, torch.float16) and linear.in_features % triton_gemv.GROUP == 0
    return (weight, None) if ok and weight.is_contiguous() else None


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0  # the mixer kernels tile whole heads (tl.arange, tl.dot)


class TritonStepOps(StepOps):
    def __init__(self, pdl: bool, devices: tuple[str, ...] = ("cuda",)):
        self.pdl = pdl  # programmatic dependent launch (Hopper and newer)
        self.devices = devices  # ("cpu",) runs the kernels in Triton's interpreter (tests)

    def _one_token(self, x: torch.Tensor) -> bool:
        return x.device.type in self.devices and x.dim() == 2 and x.shape[0] == 1

    def norm_linears(self, x, norm_weight, eps, zero_centered, linears):
        weights = _weights(linears[0]) if len(linears) == 1 and self._one_token(x) else None
        if weights is None:
            return super().norm_linears(x, norm_weight, eps, zero_centered, linears)
        y = triton_gemv.gemv(x, *weights, norm=(norm_weight, eps, zero_centered), pdl=self.pdl)
        return (y.view(1, -1),)

    def norm_swiglu(self, x, norm_weight, eps, zero_centered, gate, up):
        gate_weights, up_weights = _weights(gate), _weights(up)
        if not self._one_token(x) or gate_weights is None or up_weights is None or (
                (gate_weights[1] is None) != (up_weights[1] is None)):
            return super().norm_swiglu(x, norm_weight, eps, zero_centered, gate, up)
        y = triton_gemv.gemv(x, *gate_weights, *up_weights, norm=(norm_weight, eps, zero_centered), pdl=self.pdl)
        return y.view(1, -1)

    def linear_residual(self, h, linear, residual):
        weights = _weights(linear)
        if isinstance(h, triton_gemv.GatedNormInput):  # from gated_delta, which checked the weights
            return triton_gemv.gemv(h.output, *weights, gated_norm=h, residual=residual.reshape(-1),
                                    pdl=self.pdl).view(1, -1)
        if weights is None or not self._one_token(h):
            return super().linear_residual(h, linear, residual)
        return triton_gemv.gemv(h, *weights, residual=residual.reshape(-1), pdl=self.pdl).view(1, -1)

    def gated_delta(self, layer, x, norm_weight, conv_state, rec_state):
        """Two launches: norm + the fused projections + causal conv, then the delta rule; the output
        norm waits for out_proj (a `GatedNormInput`)."""
        cfg = layer.cfg
        projections = layer.projections()
        in_weights = _weights(projections[0]) if len(projections) == 1 else None
        dims = (cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        if (not self._one_token(x) or in_weights is None or _weights(layer.out_proj) is None
                or not all(map(_power_of_two, dims))):
            return super().gated_delta(layer, x, norm_weight, conv_state, rec_state)
        eps, hv, dv = cfg.rms_norm_eps, cfg.linear_num_value_heads, cfg.linear_value_head_dim
        projected = triton_gemv.gemv(x, *in_weights, norm=(norm_weight, eps, True),
                                     conv=(conv_state, layer.conv1d.weight.view(cfg.conv_dim, -1)), pdl=self.pdl)
        o, sumsq = triton_mixers.gated_delta_step(
            projected, layer.A_log, layer.dt_bias, rec_state, (cfg.linear_num_key_heads, hv), dims, pdl=self.pdl)
        gate = projected[cfg.conv_dim : cfg.conv_dim + hv * dv]
        return triton_gemv.GatedNormInput(o, sumsq, gate, layer.norm.weight, eps, dv)

    def attention(self, layer, x, norm_weight, cos, sin, positions, key_cache, value_cache, kv_len):
        cfg = layer.cfg
        projections = layer.projections()
        weights = _weights(projections[0]) if len(projections) == 1 else None
        if not self._one_token(x) or weights is None or not _power_of_two(cfg.head_dim):
            return super().attention(layer, x, norm_weight, cos, sin, positions, key_cache, value_cache, kv_len)
        projected = triton_gemv.gemv(x, *weights, norm=(norm_weight, cfg.rms_norm_eps, layer.zero_centered),
                                     pdl=self.pdl)
        o = triton_mixers.attention_step(
            projected, positions, layer.q_norm.weight, layer.k_norm.weight, cos, sin, key_cache, value_cache,
            (cfg.num_attention_heads, cfg.num_key_value_heads), cfg.head_dim, layer.output_gate, layer.zero_centered,
            cfg.rms_norm_eps, pdl=self.pdl,
        )
        return o.view(1, -1)
