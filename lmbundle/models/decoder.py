"""The pieces Qwen3.5 and Qwen3-VL decoders share: config, attention, MLP, the decoder layer, and the
step plumbing (embedding, rotary tables, final norm + head, one step or a chunk on a `State`).

Each architecture module (`qwen35.py`, `qwen3vl.py`) builds its layers from these and writes its own
`hidden_states`: the loop over the layers, in one place. Parameter names are the checkpoint's
(`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`), so loading is an identity map.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from .layers import AttentionDims, mrope_axes, mrope_cos_sin, rope_inv_freq
from .linear import Linear
from .ops import REFERENCE, AttentionWeights, Norm, Rope, StepOps
from .state import FULL_ATTENTION, State, StateSpec
from .vision import VISION_PREFIXES


@dataclass
class DecoderConfig:
    """The text decoder's config, read from a checkpoint's (text) config dict by `from_hf`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    mrope_section: list[int] = field(default_factory=lambda: [11, 11, 10])
    attn_output_gate: bool = True  # Qwen3.5's attention gates its output; Qwen3-VL's does not
    norm_zero_centered: bool = True  # Qwen3.5's RMSNorm scales by 1 + w; Qwen3-VL's by w
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    eos_token_id: list[int] = field(default_factory=list)

    # what a checkpoint's config leaves out means this for the architecture (transformers' defaults)
    hf_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [FULL_ATTENTION] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")

    @classmethod
    def from_hf(cls, text_config: dict[str, Any], tie_word_embeddings: bool | None = None) -> "DecoderConfig":
        """Build from a checkpoint's (text) config; rope keys in either transformers layout
        (`rope_parameters`, or `rope_scaling` + top-level keys)."""
        rope = dict(text_config.get("rope_parameters") or text_config.get("rope_scaling") or {})
        known = {f.name for f in fields(cls)}
        args = dict(cls.hf_defaults)
        args.update({k: v for k, v in text_config.items() if k in known and v is not None})
        args.setdefault("head_dim", text_config["hidden_size"] // text_config["num_attention_heads"])
        for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
            if key in rope and rope[key] is not None:
                args[key] = rope[key]
        if tie_word_embeddings is not None:
            args["tie_word_embeddings"] = tie_word_embeddings
        eos = text_config.get("eos_token_id")
        args["eos_token_id"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        cls.complete_hf_args(args, text_config)
        return cls(**args)

    @classmethod
    def complete_hf_args(cls, args: dict[str, Any], text_config: dict[str, Any]) -> None:
        """Architecture-specific keys an older config spells differently (none here)."""

    def attention_dims(self) -> AttentionDims:
        return AttentionDims(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.rms_norm_eps,
                             self.attn_output_gate, self.norm_zero_centered)


class Weight(nn.Module):
    """A holder for one named parameter (norms, conv1d, embeddings keep the checkpoint's names)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape), requires_grad=False)


class GatedAttention(nn.Module):
    """Full attention over the KV cache; with `output_gate` (Qwen3.5) q_proj also yields a sigmoid gate."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.dims = dims = cfg.attention_dims()
        self.q_proj = Linear(cfg.hidden_size, dims.heads * dims.head_dim * (2 if dims.output_gate else 1))
        self.k_proj = Linear(cfg.hidden_size, dims.kv_heads * dims.head_dim)
        self.v_proj = Linear(cfg.hidden_size, dims.kv_heads * dims.head_dim)
        self.o_proj = Linear(dims.heads * dims.head_dim, cfg.hidden_size)
        self.q_norm = Weight(dims.head_dim)
        self.k_norm = Weight(dims.head_dim)
        self.qkv_fused: Linear | None = None

    @property
    def out_proj(self) -> Linear:
        return self.o_proj

    def fuse_projections_(self) -> None:
        """Read q, k and v as one weight (a decode-speed layout, built at load time)."""
        self.qkv_fused = Linear.concat([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def weights(self) -> AttentionWeights:
        in_proj = [self.qkv_fused] if self.qkv_fused is not None else [self.q_proj, self.k_proj, self.v_proj]
        return AttentionWeights(in_proj, self.q_norm.weight, self.k_norm.weight, self.dims)

    def forward(self, x: torch.Tensor, norm: Norm, kv: tuple[torch.Tensor, torch.Tensor], rope: Rope,
                ops: StepOps) -> torch.Tensor:
        """x [S, hidden], the residual stream -> [S, H * D], before o_proj. Writes k/v at the tokens'
        positions of the layer's cache kv = (key, value) [KVH, capacity, D]."""
        return ops.attention_mixer(x, norm, self.weights(), rope, *kv)


class MLP(nn.Module):
    """SwiGLU MLP with its pre-norm and residual: x + down(silu(gate(h)) * up(h)), h = rms_norm(x)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor, norm: Norm, ops: StepOps) -> torch.Tensor:
        h = ops.norm_swiglu(x, norm, self.gate_proj, self.up_proj)
        return ops.linear_residual(h, self.down_proj, x)


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then the MLP block. The mixer is `linear_attn` (GDN) or `self_attn`."""

    def __init__(self, cfg: DecoderConfig, layer_type: str, mixer: nn.Module):
        super().__init__()
        self.is_linear = layer_type != FULL_ATTENTION
        if self.is_linear:
            self.linear_attn = mixer
        else:
            self.self_attn = mixer
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = Weight(cfg.hidden_size)
        self.post_attention_layernorm = Weight(cfg.hidden_size)
        self.eps, self.zero_centered = cfg.rms_norm_eps, cfg.norm_zero_centered

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.is_linear else self.self_attn

    def forward(self, x: torch.Tensor, layer_state: tuple[torch.Tensor, torch.Tensor], rope: Rope,
                ops: StepOps) -> torch.Tensor:
        mixer = self.mixer
        o = mixer(x, Norm(self.input_layernorm.weight, self.eps, self.zero_centered), layer_state, rope, ops)
        x = ops.linear_residual(o, mixer.out_proj, x)
        return self.mlp(x, Norm(self.post_attention_layernorm.weight, self.eps, self.zero_centered), ops)


class TextModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = Weight(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = Weight(cfg.hidden_size)


class DecoderForStep(nn.Module):
    """A decoder as a step graph: `step` (one token, loop-free) and `forward_tokens` (a chunk) on a
    `State`. Subclasses build `self.model` and write `hidden_states`."""

    config_class: ClassVar[type[DecoderConfig]] = DecoderConfig

    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], state_spec: StateSpec):
        super().__init__()
        self.cfg, self.state_spec = cfg, state_spec
        self.ops: StepOps = REFERENCE  # a backend gives the model its own (fused kernels, Core AI ops)
        self.model = TextModel(cfg, layers)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.tie_head()
        self.inv_freq = nn.Buffer(
            rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.partial_rotary_factor), persistent=False
        )
        axes = torch.tensor(mrope_axes(self.inv_freq.numel(), cfg.mrope_section))
        self.rope_axes = nn.Buffer(axes, persistent=False)  # a constant: no index math in the graph

    def tie_head(self) -> None:
        """Make lm_head read the embedding table (the tied fp16 head of fp16 / int8lin bundles)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections_(self) -> None:
        """Concatenate the projections that read the same input (fewer, larger GEMVs on the GPU)."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections_"):
                module.fuse_projections_()

    def prompt_window_free(self, state: State) -> bool:
        """Whether prompt chunks on `state` compute the same bits whatever their kv_len (every attention
        layer's chunk attention stops at the tokens' positions): then one captured graph serves all windows."""
        return all(layer.is_linear or self.ops.prompt_attention_by_position(layer.self_attn.weights(), kv[0])
                   for layer, kv in zip(self.model.layers, self.state_spec.per_layer(state)))

    def new_state(self, capacity: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> State:
        weight = self.model.embed_tokens.weight
        return self.state_spec.new(capacity, device or weight.device, dtype or weight.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens.weight[ids]

    def rope_positions(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions [3, S] (t, h, w) of the tokens; text only here, so the three are equal."""
        return positions.unsqueeze(0).expand(3, -1)

    def rope(self, ids: torch.Tensor, positions: torch.Tensor, kv_len: int, valid: torch.Tensor | None = None) -> Rope:
        cos, sin = mrope_cos_sin(self.rope_positions(ids, positions), self.inv_freq, self.rope_axes)
        return Rope(cos, sin, positions, kv_len, valid)

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, state: State, kv_len: int,
                      ops: StepOps | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream [S, hidden] after the last layer (before the final norm) of tokens ids [S]
        (with `ops` instead of the model's own: the batched step's). With `valid` ([1], on the device) only
        the first `valid` tokens are real: the rest are padding that leaves the GDN states as the real
        tokens left them and writes KV only past them (a CUDA graph of a fixed chunk length, `engine/graphs.py`)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor, ops: StepOps | None = None) -> torch.Tensor:
        """Final norm and lm_head: logits [S, V] in fp32."""
        norm = Norm(self.model.norm.weight, self.cfg.rms_norm_eps, self.cfg.norm_zero_centered)
        return (ops or self.ops).norm_linears(x, norm, [self.lm_head])[0].float()

    def forward_tokens(
        self, ids: torch.Tensor, start: int, state: State, kv_len: int | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """A chunk: ids [S] at positions start..start+S-1; returns logits [S, V] (or [1, V])."""
        positions = torch.arange(start, start + ids.shape[0], device=ids.device)
        x = self.hidden_states(ids, positions, state, kv_len or start + ids.shape[0])
        if last_only:
            x = x[-1:]
        return self.head(x)

    def step(self, input_ids: torch.Tensor, position: torch.Tensor, state: State, kv_len: int,
             with_head: bool = True) -> torch.Tensor:
        """One decode step: input_ids [1, 1], position [1] (a device tensor); returns logits [1, 1, V].

        kv_len is the static attention window (>= position + 1); slots past the position are masked.
        Without the head (S=1 prefill of all but the last prompt token) it only advances the state and
        returns the residual stream: the head is a quarter of the 2B's bytes per token.
        """
        x = self.hidden_states(input_ids.view(1), position.view(1), state, kv_len)
        if not with_head:
            return x
        return self.head(x).view(1, 1, -1)

    def step_rows(self, ids: torch.Tensor, positions: torch.Tensor, state: State, kv_len: int,
                  ops: StepOps | None = None) -> torch.Tensor:
        """The batched decode step: ids [B], token i of the sequence in row i of `state` (`State.rows_of`)
        at positions[i]; the same graph as `step`, each layer's state with a row axis. Logits [B, V]."""
        return self.head(self.hidden_states(ids, positions, state, kv_len, ops), ops)


@dataclass(frozen=True)
class Architecture:
    """What the registry (`models/__init__.py`) knows of an architecture."""

    name: str  # recorded in bundles: "qwen3_5", "qwen3_vl"
    hf_architectures: tuple[str, ...]  # config.json `architectures` entries it reads
    hf_model_types: tuple[str, ...]  # config.json `model_type` values it reads
    config: type[DecoderConfig]
    model: type[DecoderForStep]
    state_spec: Callable[[Any], StateSpec]
    sanitize: Callable[[str], str | None]  # checkpoint tensor name -> graph name, None: not ours


_TEXT_PREFIXES = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
)


def sanitize_text(name: str) -> str | None:
    """The text graph's name of a checkpoint tensor in any of transformers' layouts (CausalLM, or the text
    half of an image-text model), None for vision-tower tensors. Safe to run twice."""
    if name.startswith(VISION_PREFIXES):
        return None
    for pattern, replacement in _TEXT_PREFIXES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name
