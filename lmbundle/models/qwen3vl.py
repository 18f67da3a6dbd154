"""Qwen3-VL's text decoder as a step graph: the shared decoder pieces (every layer full attention) with
image prompts (`image_prompt.py`: image embeddings in the id space, in-graph M-RoPE) and DeepStack:
after decoder layer l < n_deepstack, image tokens add their row of the encoder's DeepStack level l.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .decoder import Architecture, DecoderConfig, DecoderForStep, DecoderLayer, GatedAttention, sanitize_text
from .image_prompt import ImagePromptGraph
from .ops import StepOps
from .state import FULL_ATTENTION, State, StateSpec


@dataclass
class Qwen3VLConfig(DecoderConfig):
    """Every layer full attention, no output gate, plain w * x RMSNorm, M-RoPE over the whole head."""

    rope_theta: float = 5000000.0
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    attn_output_gate: bool = False
    norm_zero_centered: bool = False

    hf_defaults: ClassVar[dict[str, Any]] = {"rope_theta": 5000000.0, "mrope_section": [24, 20, 20]}


def state_spec(cfg: Qwen3VLConfig) -> StateSpec:
    """KV caches only."""
    return StateSpec(layer_types=tuple(cfg.layer_types), conv=(0, 0), rec=(0, 0, 0),
                     kv=(cfg.num_key_value_heads, cfg.head_dim))


class Qwen3VLForStep(ImagePromptGraph, DecoderForStep):
    """The Qwen3-VL decoder with image prompts."""

    config_class = Qwen3VLConfig

    def __init__(self, cfg: Qwen3VLConfig):
        layers = [DecoderLayer(cfg, FULL_ATTENTION, GatedAttention(cfg)) for _ in range(cfg.num_hidden_layers)]
        super().__init__(cfg, layers, state_spec(cfg))

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, state: State, kv_len: int,
                      ops: StepOps | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Embed (text rows or image embeddings), then every attention layer in order, the first
        n_deepstack of them followed by their DeepStack add."""
        x = self.embed(ids)
        rope, ops = self.rope(ids, positions, kv_len, valid), ops or self.ops
        for index, (layer, kv) in enumerate(zip(self.model.layers, self.state_spec.per_layer(state))):
            x = self.deepstack(index, layer(x, kv, rope, ops), ids)
        return x


ARCHITECTURE = Architecture(
    name="qwen3_vl",
    hf_architectures=("Qwen3VLForConditionalGeneration",),
    hf_model_types=("qwen3_vl",),
    config=Qwen3VLConfig,
    model=Qwen3VLForStep,
    state_spec=state_spec,
    sanitize=sanitize_text,
)
