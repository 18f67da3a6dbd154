"""Qwen3.5 text model (Gated DeltaNet hybrid) as one graph, shared by the PyTorch backend, the gates and
the Core AI exporter.

The same code runs one loop-free decode step (`step`, input_ids [1, 1]) and a chunk of S tokens
(`forward_tokens`, prefill and teacher forcing) against an explicit `State`: fixed-size GDN parts
(conv and recurrent) and a KV part with a capacity the engine grows. Parameter names are the
checkpoint's (`model.layers.N...`, `lm_head.weight`), so loading is an identity map.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    apply_rope,
    attention,
    causal_conv,
    gated_delta_chunk,
    gated_delta_step,
    gated_rms_norm,
    l2_normalize,
    mrope_axes,
    mrope_cos_sin,
    rms_norm,
    rope_inv_freq,
)
from .linear import Linear
from .step_ops import REFERENCE, StepOps


@dataclass
class Qwen35Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    layer_types: list[str]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    mrope_section: list[int] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    eos_token_id: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, text_config: dict[str, Any], tie_word_embeddings: bool | None = None) -> "Qwen35Config":
        """Build from a checkpoint's (text) config dict; rope keys come in either transformers layout."""
        rope = dict(text_config.get("rope_parameters") or text_config.get("rope_scaling") or {})
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in text_config.items() if k in known}
        args["rope_theta"] = rope.get("rope_theta", text_config.get("rope_theta", 10000.0))
        args["partial_rotary_factor"] = rope.get(
            "partial_rotary_factor", text_config.get("partial_rotary_factor", 1.0)
        )
        args["mrope_section"] = rope.get("mrope_section", [11, 11, 10])  # transformers' default
        if tie_word_embeddings is not None:
            args["tie_word_embeddings"] = tie_word_embeddings
        eos = text_config.get("eos_token_id")
        args["eos_token_id"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not args.get("layer_types"):
            interval = text_config.get("full_attention_interval", 4)
            args["layer_types"] = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(text_config["num_hidden_layers"])
            ]
        return cls(**args)

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim
        )


@dataclass
class State:
    """Everything a decode step reads and writes besides the weights.

    conv [n_linear, 1, conv_dim, K-1] and rec [n_linear, 1, Hv, Dk, Dv] (fp32) are fixed-size;
    key/value [n_full, 1, kv_heads, capacity, head_dim] grow with the context.
    """

    conv: torch.Tensor
    rec: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.key.shape[3]

    def zero_(self) -> "State":
        for t in (self.conv, self.rec, self.key, self.value):
            t.zero_()
        return self

    def grown(self, capacity: int) -> "State":
        """A copy with a larger KV capacity (the written prefix is copied on the device)."""
        if capacity <= self.capacity:
            return self
        shape = (*self.key.shape[:3], capacity, self.key.shape[4])
        key = self.key.new_zeros(shape)
        value = self.value.new_zeros(shape)
        key[:, :, :, : self.capacity].copy_(self.key)
        value[:, :, :, : self.capacity].copy_(self.value)
        return State(self.conv, self.rec, key, value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"conv": self.conv, "rec": self.rec, "key": self.key, "value": self.value}


class Weight(nn.Module):
    """A holder for one named parameter (norms, conv1d, embeddings keep the checkpoint's names)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape), requires_grad=False)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        self.cfg = cfg
        hv, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
        self.in_proj_qkv = Linear(cfg.hidden_size, cfg.conv_dim)
        self.in_proj_z = Linear(cfg.hidden_size, hv * dv)
        self.in_proj_b = Linear(cfg.hidden_size, hv)
        self.in_proj_a = Linear(cfg.hidden_size, hv)
        self.conv1d = Weight(cfg.conv_dim, 1, cfg.linear_conv_kernel_dim)
        self.dt_bias = nn.Parameter(torch.empty(hv), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(hv), requires_grad=False)
        self.norm = Weight(dv)
        self.out_proj = Linear(hv * dv, cfg.hidden_size)
        self.in_proj_fused: Linear | None = None

    def fuse_projections_(self) -> None:
        """Read the four input projections as one weight (a decode-speed layout, built at load time)."""
        self.in_proj_fused = Linear.concat([self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a])
        del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a

    def projections(self) -> list[Linear]:
        if self.in_proj_fused is not None:
            return [self.in_proj_fused]
        return [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]

    def forward(self, x: torch.Tensor, norm_weight: torch.Tensor, conv_state: torch.Tensor, rec_state: torch.Tensor,
                ops: StepOps) -> torch.Tensor:
        """x [S, hidden] (the residual stream; the layer's input norm is applied here) -> [S, Hv * Dv],
        the mixer output before out_proj. conv_state [C, K-1] and rec_state [Hv, Dk, Dv] are updated in place."""
        return ops.gated_delta(self, x, norm_weight, conv_state, rec_state)

    def mix(self, projected: tuple[torch.Tensor, ...], conv_state: torch.Tensor, rec_state: torch.Tensor) -> torch.Tensor:
        """The reference math from the projections (qkv, z, b, a, or the four fused) to the normed output."""
        cfg = self.cfg
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if len(projected) == 1:
            projected = projected[0].split([cfg.conv_dim, hv * dv, hv, hv], dim=-1)
        qkv, z, b, a = projected
        seq, dtype = qkv.shape[0], qkv.dtype
        qkv = causal_conv(qkv, conv_state, self.conv1d.weight[:, 0])
        q, k, v = torch.split(qkv, [hk * dk, hk * dk, hv * dv], dim=-1)
        q = l2_normalize(q.reshape(seq, hk, dk).float())
        k = l2_normalize(k.reshape(seq, hk, dk).float())
        v = v.reshape(seq, hv, dv).float()
        if hv != hk:
            q = q.repeat_interleave(hv // hk, dim=1)
            k = k.repeat_interleave(hv // hk, dim=1)
        q = q * dk**-0.5
        beta = torch.sigmoid(b).float()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        if seq == 1:
            o = gated_delta_step(q[0], k[0], v[0], g[0], beta[0], rec_state).unsqueeze(0)
        else:
            o = gated_delta_chunk(q, k, v, g, beta, rec_state)
        z = z.reshape(seq, hv, dv)
        o = gated_rms_norm(o.to(dtype), z, self.norm.weight, cfg.rms_norm_eps)
        return o.reshape(seq, hv * dv)


class GatedAttention(nn.Module):
    def __init__(self, cfg: Qwen35Config, output_gate: bool = True, zero_centered: bool = True):
        super().__init__()
        self.cfg, self.output_gate, self.zero_centered = cfg, output_gate, zero_centered
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, h * d * (2 if output_gate else 1))
        self.k_proj = Linear(cfg.hidden_size, kvh * d)
        self.v_proj = Linear(cfg.hidden_size, kvh * d)
        self.o_proj = Linear(h * d, cfg.hidden_size)
        self.q_norm = Weight(d)
        self.k_norm = Weight(d)
        self.qkv_fused: Linear | None = None

    def fuse_projections_(self) -> None:
        """Read q, k and v as one weight (a decode-speed layout, built at load time)."""
        self.qkv_fused = Linear.concat([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def projections(self) -> list[Linear]:
        return [self.qkv_fused] if self.qkv_fused is not None else [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, kv_len: int,
                ops: StepOps) -> torch.Tensor:
        """x [S, hidden] (the residual stream; the input norm is applied here) -> [S, H * D] before o_proj.
        Writes k/v at `positions` of key/value_cache [KVH, capacity, D] and attends over the first kv_len slots."""
        return ops.attention(self, x, norm_weight, cos, sin, positions, key_cache, value_cache, kv_len)

    def attend(self, projected: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               key_cache: torch.Tensor, value_cache: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The reference math from the projections (q, k, v, or the three fused) to the (gated) output."""
        cfg = self.cfg
        heads, kvh, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
        if len(projected) == 1:
            projected = projected[0].split([heads * d * (2 if self.output_gate else 1), kvh * d, kvh * d], dim=-1)
        q, k, v = projected
        seq, dtype = q.shape[0], q.dtype
        q = q.reshape(seq, heads, -1)
        if self.output_gate:
            q, gate = q[..., :d], q[..., d:].reshape(seq, heads * d)
        q = rms_norm(q, self.q_norm.weight, eps, self.zero_centered).transpose(0, 1)
        k = rms_norm(k.reshape(seq, kvh, d), self.k_norm.weight, eps, self.zero_centered)
        v = v.reshape(seq, kvh, d).transpose(0, 1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k.transpose(0, 1), cos, sin)
        slots = positions.view(1, -1, 1).expand(kvh, seq, d)  # a scatter, not index_copy_: it lowers to Core AI
        key_cache.scatter_(1, slots, k.to(key_cache.dtype))   # on a KV cache of dynamic length
        value_cache.scatter_(1, slots, v.to(value_cache.dtype))
        o = attention(q, key_cache[:, :kv_len], value_cache[:, :kv_len], positions).to(dtype)
        if self.output_gate:
            o = o * torch.sigmoid(gate)
        return o


class MLP(nn.Module):
    """The MLP's weights; the graph applies them through `StepOps.norm_swiglu` and `linear_residual`."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen35Config, layer_type: str, mixer: nn.Module):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = mixer
        else:
            self.self_attn = mixer
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = Weight(cfg.hidden_size)
        self.post_attention_layernorm = Weight(cfg.hidden_size)


class TextModel(nn.Module):
    def __init__(self, cfg: Qwen35Config, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = Weight(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = Weight(cfg.hidden_size)


class Qwen35ForStep(nn.Module):
    """The Qwen3.5 graph: `step` (one token, loop-free) and `forward_tokens` (a chunk) on a `State`."""

    config_class = Qwen35Config
    zero_centered_norm = True
    step_ops: StepOps = REFERENCE  # a backend installs fused kernels here (CUDA)

    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        self.cfg = cfg
        layers = [
            DecoderLayer(cfg, t, GatedDeltaNet(cfg) if t == "linear_attention" else GatedAttention(cfg))
            for t in cfg.layer_types
        ]
        self.model = TextModel(cfg, layers)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.tie_head()
        self.inv_freq = nn.Buffer(
            rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.partial_rotary_factor), persistent=False
        )
        self.set_rope_axes()

    def set_rope_axes(self) -> None:
        """The M-RoPE axis of each rotary frequency, a constant buffer (no index math in the graph)."""
        section = self.cfg.mrope_section
        axes = None if section is None else torch.tensor(mrope_axes(self.inv_freq.numel(), section))
        self.rope_axes = nn.Buffer(axes, persistent=False)

    def tie_head(self) -> None:
        """Make lm_head read the embedding table (the tied fp16 head of fp16 / int8lin bundles)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections_(self) -> None:
        """Concatenate the projections that read the same input (fewer, larger GEMVs on the GPU)."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections_"):
                module.fuse_projections_()

    def new_state(self, capacity: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        cfg = self.cfg
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        n_lin, n_full = len(cfg.linear_layers), len(cfg.full_layers)
        return State(
            conv=torch.zeros(n_lin, 1, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype, device=device),
            rec=torch.zeros(
                n_lin, 1, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                dtype=torch.float32, device=device,
            ),
            key=torch.zeros(n_full, 1, cfg.num_key_value_heads, capacity, cfg.head_dim, dtype=dtype, device=device),
            value=torch.zeros(n_full, 1, cfg.num_key_value_heads, capacity, cfg.head_dim, dtype=dtype, device=device),
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens.weight[ids]

    def rope_positions(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions [3, S] of the tokens; text only here, so the three axes are equal."""
        return positions.unsqueeze(0).expand(3, -1)

    def decoder_hook(self, layer_index: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-layer residual addition (Qwen3-VL's DeepStack overrides this); identity here."""
        return x

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, state: State, kv_len: int) -> torch.Tensor:
        """The residual stream [S, hidden] after the last layer (before the final norm) of tokens ids [S]."""
        cfg, ops, zero_centered = self.cfg, self.step_ops, self.zero_centered_norm
        x = self.embed(ids)
        cos, sin = mrope_cos_sin(self.rope_positions(ids, positions), self.inv_freq, self.rope_axes)
        n_lin = n_full = 0
        for i, layer in enumerate(self.model.layers):
            norm = layer.input_layernorm.weight
            if layer.is_linear:
                mixer = layer.linear_attn
                o = mixer(x, norm, state.conv[n_lin, 0], state.rec[n_lin, 0], ops)
                x = ops.linear_residual(o, mixer.out_proj, x)
                n_lin += 1
            else:
                mixer = layer.self_attn
                o = mixer(x, norm, cos, sin, positions, state.key[n_full, 0], state.value[n_full, 0], kv_len, ops)
                x = ops.linear_residual(o, mixer.o_proj, x)
                n_full += 1
            mlp = layer.mlp
            h = ops.norm_swiglu(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps, zero_centered,
                                mlp.gate_proj, mlp.up_proj)
            x = self.decoder_hook(i, ops.linear_residual(h, mlp.down_proj, x), ids)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: logits [S, V] in fp32."""
        norm = self.model.norm.weight
        return self.step_ops.norm_linears(x, norm, self.cfg.rms_norm_eps, self.zero_centered_norm, [self.lm_head])[0].float()

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
