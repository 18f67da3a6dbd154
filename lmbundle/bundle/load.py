"""Building a graph and filling it with weights: from a bundle (`load_graph`), or by `convert` from a checkpoint.

The graph is built from the architecture the metadata names and the quant recipe it records, never
from guesses about tensor shapes; every tensor is checked by name and shape as it is copied in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LmbundleError
from ..models import get_architecture
from ..models.decoder import Architecture, DecoderConfig, DecoderForStep
from ..models.state import StateSpec
from .format import METADATA, Bundle
from .quant import apply_layout, cast_float_weights, keeps_high_precision


def build_graph(model_class: type[DecoderForStep], cfg: DecoderConfig, dtype: torch.dtype) -> DecoderForStep:
    """The graph with its weights allocated (uninitialised) directly in `dtype`: no fp32 detour, so
    converting needs about the checkpoint's size in memory, not twice it."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_class(cfg)
    finally:
        torch.set_default_dtype(default)
    for name, param in model.named_parameters():
        if keeps_high_precision(name):  # GDN parameters and norms load into fp32 whatever the compute dtype
            param.data = param.data.float()
    if cfg.tie_word_embeddings:
        model.tie_head()
    return model


def load_weights(module: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], where: Path,
                 strict: bool = False) -> None:
    """Copy (name, tensor) pairs into module's parameters and buffers, checking names and shapes; with
    `strict` (a bundle, which holds exactly its graph's tensors) a tensor the graph has no place for is an error."""
    targets = dict(module.named_parameters(remove_duplicate=False))
    targets.update(dict(module.named_buffers(remove_duplicate=False)))
    missing = {name for name in targets if not _is_derived(name)}
    for name, tensor in tensors:
        target = targets.get(name)
        if target is None:
            if strict:
                raise LmbundleError(f"{where}: tensor {name} is not part of the graph its metadata describes")
            continue  # a checkpoint's extra tensors (e.g. lm_head of a tied checkpoint we tie ourselves)
        if tuple(target.shape) != tuple(tensor.shape):
            raise LmbundleError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        missing.discard(name)
        for alias, other in targets.items():  # tied weights share storage: one copy fills both names
            if other is target:
                missing.discard(alias)
    if missing:
        raise LmbundleError(f"{where}: missing tensor(s) {', '.join(sorted(missing)[:3])}")


def _is_derived(name: str) -> bool:
    """Buffers computed from the config (rope frequencies) are not read from checkpoints."""
    return name.endswith(("inv_freq", "rope_axes"))


def read_safetensors(module: torch.nn.Module, path: Path, strict: bool = False) -> None:
    """`load_weights` from one safetensors file, its read errors as one line."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            load_weights(module, ((k, handle.get_tensor(k)) for k in handle.keys()), path, strict)
    except LmbundleError:
        raise
    except Exception as exc:
        raise LmbundleError(f"{path}: unreadable weights ({str(exc).splitlines()[0][:200]})") from None


def decoder_config(bundle: Bundle) -> tuple[Architecture, DecoderConfig]:
    """The bundle's architecture and decoder config, as its metadata records them."""
    info = bundle.info
    arch = get_architecture(info["architecture"])
    try:
        return arch, arch.config(**info["config"])
    except (TypeError, ValueError) as exc:
        raise LmbundleError(f"{bundle.path / METADATA}: bad config ({exc})") from None


def state_spec(bundle: Bundle) -> StateSpec:
    """The decode state of the bundle's graph (what a backend holds and the gates seed)."""
    arch, cfg = decoder_config(bundle)
    return arch.state_spec(cfg)


def load_graph(bundle: Bundle, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               verify: bool = True) -> DecoderForStep:
    """Build the bundle's graph from its metadata and load its weights (checked against their sha256)."""
    info = bundle.info
    if not info.get("weights"):
        raise LmbundleError(f"{bundle.path}: this bundle has no PyTorch weights (converted with --backend coreai): "
                            "run it with --backend coreai")
    weights = bundle.path / info["weights"]
    if verify:
        bundle.verify([info["weights"]])
    arch, cfg = decoder_config(bundle)
    model = build_graph(arch.model, cfg, dtype)
    apply_layout(model, info["quant"])
    read_safetensors(model, weights, strict=True)
    cast_float_weights(model, dtype)
    if info["quant"]["tied_head"]:
        model.tie_head()
    return model.to(device).eval()
