"""Qwen3.5 (the Gated DeltaNet hybrid) as one step graph, shared by the PyTorch backend, the gates and the
Core AI exporter.

The decoder stacks layers of two kinds, per the config's `layer_types` (the 2B: 18 `linear_attention`
= Gated DeltaNet, 6 `full_attention`, in a 3:1 pattern). Each layer is x + mixer(norm(x)) then
x + MLP(norm(x)); the GDN mixer carries a conv state and a recurrent state, attention a KV cache.
The same code runs one loop-free decode step (`step`, input_ids [1, 1]) and a chunk of S tokens
(`forward_tokens`: prefill and teacher forcing; the delta rule in WY chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .decoder import Architecture, DecoderConfig, DecoderForStep, DecoderLayer, GatedAttention, Weight, sanitize_text
from .image_prompt import ImagePromptGraph
from .layers import GDNDims
from .linear import Linear
from .ops import GDNWeights, Norm, Rope, StepOps
from .state import FULL_ATTENTION, LINEAR_ATTENTION, State, StateSpec


@dataclass
class Qwen35Config(DecoderConfig):
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4

    @classmethod
    def complete_hf_args(cls, args: dict[str, Any], text_config: dict[str, Any]) -> None:
        """Configs that predate `layer_types` give `full_attention_interval` (every 4th layer)."""
        if not args.get("layer_types"):
            interval = text_config.get("full_attention_interval", 4)
            args["layer_types"] = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION
                                   for i in range(text_config["num_hidden_layers"])]

    def gdn_dims(self) -> GDNDims:
        return GDNDims(self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                       self.linear_value_head_dim, self.rms_norm_eps)


def state_spec(cfg: Qwen35Config) -> StateSpec:
    dims = cfg.gdn_dims()
    return StateSpec(
        layer_types=tuple(cfg.layer_types),
        conv=(dims.conv_dim, cfg.linear_conv_kernel_dim - 1),
        rec=(dims.value_heads, dims.key_dim, dims.value_dim),
        kv=(cfg.num_key_value_heads, cfg.head_dim),
    )


class GatedDeltaNet(nn.Module):
    """The linear-attention mixer: input projections, causal conv, gated delta rule, gated norm."""

    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        self.dims = dims = cfg.gdn_dims()
        hv, dv = dims.value_heads, dims.value_dim
        self.in_proj_qkv = Linear(cfg.hidden_size, dims.conv_dim)
        self.in_proj_z = Linear(cfg.hidden_size, hv * dv)
        self.in_proj_b = Linear(cfg.hidden_size, hv)
        self.in_proj_a = Linear(cfg.hidden_size, hv)
        self.conv1d = Weight(dims.conv_dim, 1, cfg.linear_conv_kernel_dim)
        self.dt_bias = nn.Parameter(torch.empty(hv), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(hv), requires_grad=False)
        self.norm = Weight(dv)
        self.out_proj = Linear(hv * dv, cfg.hidden_size)
        self.in_proj_fused: Linear | None = None

    def fuse_projections_(self) -> None:
        """Read the four input projections as one weight (a decode-speed layout, built at load time)."""
        self.in_proj_fused = Linear.concat([self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a])
        del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a

    def weights(self) -> GDNWeights:
        in_proj = ([self.in_proj_fused] if self.in_proj_fused is not None
                   else [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a])
        return GDNWeights(in_proj, self.conv1d.weight[:, 0], self.A_log, self.dt_bias, self.norm.weight,
                          self.out_proj, self.dims)

    def forward(self, x: torch.Tensor, norm: Norm, conv_rec: tuple[torch.Tensor, torch.Tensor], rope: Rope,
                ops: StepOps) -> torch.Tensor:
        """x [S, hidden], the residual stream -> [S, Hv * Dv], before out_proj. The layer's conv state
        [C, K-1] and recurrent state [Hv, Dk, Dv] (conv_rec) are updated in place; no rotary here."""
        return ops.gdn_mixer(x, norm, self.weights(), *conv_rec, rope.valid)


class Qwen35ForStep(ImagePromptGraph, DecoderForStep):
    """The Qwen3.5 decoder; with an `ImageContext` set (a checkpoint with a vision tower) it takes image
    prompts the Qwen3-VL way, without DeepStack. Text-only it is the plain text model."""

    config_class = Qwen35Config

    def __init__(self, cfg: Qwen35Config):
        layers = [DecoderLayer(cfg, kind, GatedDeltaNet(cfg) if kind == LINEAR_ATTENTION else GatedAttention(cfg))
                  for kind in cfg.layer_types]
        super().__init__(cfg, layers, state_spec(cfg))

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, state: State, kv_len: int,
                      ops: StepOps | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The whole step up to the final norm: embed, then every layer in order, each with its part of
        the state (GDN: conv + recurrent; attention: its KV cache)."""
        x = self.embed(ids)
        rope, ops = self.rope(ids, positions, kv_len, valid), ops or self.ops
        for layer, layer_state in zip(self.model.layers, self.state_spec.per_layer(state)):
            x = layer(x, layer_state, rope, ops)
        return x


def sanitize(name: str) -> str | None:
    """Checkpoint name -> graph name; the multi-token-prediction head (`mtp.*`) is not run here."""
    return None if name.startswith("mtp.") else sanitize_text(name)


ARCHITECTURE = Architecture(
    name="qwen3_5",
    hf_architectures=("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"),
    hf_model_types=("qwen3_5", "qwen3_5_text"),
    config=Qwen35Config,
    model=Qwen35ForStep,
    state_spec=state_spec,
    sanitize=sanitize,
)
