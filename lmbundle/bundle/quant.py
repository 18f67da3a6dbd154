"""The quant modes of a bundle (the seeds' recipes) and what they cost per decoded token.

- fp16:    every weight fp16.
- int8lin: every linear of the decoder int8, per-block-32 along the input dim, symmetric absmax;
           the head stays as the checkpoint has it (tied: the fp16 embedding table).
- int8hu:  int8lin + an untied int8 lm_head, plain absmax (block-32 or per-channel), never clipped.
GDN parameters (A_log, dt_bias, conv1d) and norms stay fp32; embeddings are a gather (one row a token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LmbundleError
from ..models.linear import BLOCK, Linear

QUANT_MODES = ("fp16", "int8lin", "int8hu")
HEAD_QUANTS = ("block32", "perchan")
_HIGH_PRECISION = ("A_log", "dt_bias", "conv1d.weight", "norm.weight", "layernorm.weight")


def keeps_high_precision(name: str) -> bool:
    return name.endswith(_HIGH_PRECISION)


def check_mode(mode: str, head_quant: str = "block32") -> None:
    if mode not in QUANT_MODES:
        raise LmbundleError(f"unknown quant mode {mode!r} (choose one of {', '.join(QUANT_MODES)})")
    if head_quant not in HEAD_QUANTS:
        raise LmbundleError(f"unknown head quant {head_quant!r} (choose one of {', '.join(HEAD_QUANTS)})")


def plan_recipe(model: nn.Module, mode: str, head_quant: str = "block32") -> dict[str, Any]:
    """The recipe `quantize_model` applies to `model` for a mode (what the gates expect of a bundle that
    declares it): which linears become int8 and over which block, and whether the head stays tied."""
    check_mode(mode, head_quant)
    int8: dict[str, int] = {}
    if mode in ("int8lin", "int8hu"):
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name != "lm_head" and module.in_features % BLOCK == 0:
                int8[name] = BLOCK
    tied = bool(model.cfg.tie_word_embeddings) and mode != "int8hu"  # int8hu unties: the head gets its own copy
    if mode == "int8hu":
        int8["lm_head"] = model.lm_head.in_features if head_quant == "perchan" else BLOCK
    head_kind = f"int8-{head_quant}" if mode == "int8hu" else ("tied-fp16" if tied else "fp16")
    return {"mode": mode, "block": BLOCK, "int8_linears": int8, "tied_head": tied, "head": head_kind}


def quantize_model(model: nn.Module, mode: str, head_quant: str = "block32") -> dict[str, Any]:
    """Quantize the graph in place; returns the recipe that `apply_layout` rebuilds it from."""
    recipe = plan_recipe(model, mode, head_quant)
    modules = dict(model.named_modules())
    if not recipe["tied_head"] and model.cfg.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    for name, block in recipe["int8_linears"].items():
        modules[name].quantize_(block)
    for name, param in model.named_parameters():
        param.data = param.data.float() if keeps_high_precision(name) else param.data.to(torch.float16)
    if recipe["tied_head"]:
        model.tie_head()
    return recipe


def apply_layout(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Give a freshly built graph the bundle's quantized layout (from metadata, never guessed)."""
    modules = dict(model.named_modules())
    if not recipe["tied_head"] and model.cfg.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight), requires_grad=False)
    for name, block in recipe["int8_linears"].items():
        modules[name].as_int8_(block)


def cast_float_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Compute dtype for the float weights; int8 weights stay int8, high-precision params stay fp32."""
    for name, param in model.named_parameters():
        if not keeps_high_precision(name):
            param.data = param.data.to(dtype)


def bytes_per_token(model: nn.Module) -> dict[str, int]:
    """Bytes a decode step reads: weights (an embedding row, not the table), GDN state read + written
    (16-bit activations), and the KV bytes each cached position adds to every later step."""
    seen: set[int] = set()
    weights = 0
    embed = model.model.embed_tokens.weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name.endswith("inv_freq"):
            continue
        seen.add(id(t))
        if t is embed and model.lm_head.weight is not embed:
            weights += embed.shape[1] * embed.element_size()  # a gather of one row
        else:
            weights += t.numel() * t.element_size()
    state = model.state_spec.bytes_per_token(dtype_bytes=2)
    return {"weights": weights, **state, "total_at_empty_context": weights + state["gdn_state"]}
