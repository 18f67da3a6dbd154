"""Reading Hugging Face checkpoints: a local folder or a hub id, streamed shard by shard.

Supported layouts: `Qwen3_5ForCausalLM` (text), `Qwen3_5ForConditionalGeneration` (text + vision tower) and
`Qwen3VLForConditionalGeneration`. Tensors are read lazily from the safetensors shards and copied
straight into the preallocated graph, so the model is never held twice in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import LmbundleError

TEXT_ARCHITECTURES = {
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}
MODEL_TYPES = {"qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_vl": "qwen3_vl"}

# checkpoint name prefix -> our graph's name prefix; `None` drops the tensor (MTP head, which we don't run)
_TEXT_RENAMES = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
)
_VISION_PREFIX = re.compile(r"^(model\.visual|visual)\.")


def _hub_like(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.startswith(".")


def resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id fetched through huggingface_hub's cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LmbundleError(f"{path}: not a checkpoint folder (expected a folder with config.json)")
        return path
    source = str(source)
    if not _hub_like(source):
        raise LmbundleError(f"{path}: no such checkpoint folder")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LmbundleError(
            f"cannot fetch hub model {source!r} (cache folder {constants.HF_HUB_CACHE}): {reason[:200]}"
        ) from None


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    architecture: str  # "qwen3_5" | "qwen3_vl"
    tensor_files: dict[str, Path]  # checkpoint tensor name -> shard

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config", self.config)

    @property
    def vision_config(self) -> dict[str, Any] | None:
        return self.config.get("vision_config")

    @property
    def tie_word_embeddings(self) -> bool:
        tied = self.config.get("tie_word_embeddings")
        if tied is None:
            tied = self.text_config.get("tie_word_embeddings", False)
        return bool(tied) or "lm_head.weight" not in self.tensor_files

    @property
    def has_vision(self) -> bool:
        return self.vision_config is not None and any(_VISION_PREFIX.match(n) for n in self.tensor_files)

    def text_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(graph name, tensor) of the text model, shard by shard."""
        for name, tensor in self._tensors():
            graph_name = text_name(name)
            if graph_name is not None:
                yield graph_name, tensor

    def vision_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name without the `model.visual.` prefix, tensor) of the vision tower."""
        for name, tensor in self._tensors(lambda n: bool(_VISION_PREFIX.match(n))):
            yield _VISION_PREFIX.sub("", name), tensor

    def _tensors(self, keep=lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for name, file in self.tensor_files.items():
            if keep(name):
                by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as shard:
                    for name in names:
                        yield name, shard.get_tensor(name)
            except LmbundleError:
                raise
            except Exception as exc:
                raise LmbundleError(f"{file}: unreadable or truncated safetensors shard ({_first_line(exc)})") from None


def text_name(name: str) -> str | None:
    """The graph's name of a checkpoint tensor, or None for tensors the text graph does not use."""
    if name.startswith("mtp.") or _VISION_PREFIX.match(name):
        return None
    for pattern, replacement in _TEXT_RENAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LmbundleError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmbundleError(f"{path}: not valid JSON ({_first_line(exc)})") from None


def _architecture(config: dict[str, Any], config_path: Path) -> str:
    for arch in config.get("architectures") or []:
        if arch in TEXT_ARCHITECTURES:
            return TEXT_ARCHITECTURES[arch]
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES and not config.get("architectures"):
        return MODEL_TYPES[model_type]
    found = ", ".join(config.get("architectures") or []) or f"model_type {model_type!r}"
    raise LmbundleError(
        f"{config_path}: unsupported architecture {found} (supported: {', '.join(TEXT_ARCHITECTURES)})"
    )


def _tensor_index(folder: Path) -> dict[str, Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = _read_json(index_path).get("weight_map")
        if not isinstance(index, dict):
            raise LmbundleError(f"{index_path}: no weight_map")
        files = {name: folder / file for name, file in index.items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise LmbundleError(f"{file}: shard listed in {index_path.name} is missing")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise LmbundleError(f"{folder}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    files: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                files.update({name: shard for name in handle.keys()})
        except Exception as exc:
            raise LmbundleError(f"{shard}: unreadable or truncated safetensors shard ({_first_line(exc)})") from None
    return files


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    folder = resolve_source(source)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LmbundleError(f"{folder}: not a checkpoint (no config.json)")
    config = _read_json(config_path)
    architecture = _architecture(config, config_path)
    return Checkpoint(folder, config, architecture, _tensor_index(folder))


def load_weights(module: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], where: Path) -> None:
    """Copy (name, tensor) pairs into module's parameters and buffers, checking names and shapes."""
    targets = dict(module.named_parameters(remove_duplicate=False))
    targets.update(dict(module.named_buffers(remove_duplicate=False)))
    missing = {name for name, t in targets.items() if not _is_derived(module, name)}
    for name, tensor in tensors:
        target = targets.get(name)
        if target is None:
            continue  # extra tensors (e.g. lm_head of a tied checkpoint we tie ourselves) are not ours to judge
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


def _is_derived(module: torch.nn.Module, name: str) -> bool:
    """Buffers computed from the config (rope frequencies) are not read from checkpoints."""
    return name.endswith(("inv_freq", "rope_axes"))


def text_model_class(architecture: str):
    """The graph class of an architecture (one per architecture, shared by every backend)."""
    from ..models.qwen3vl import Qwen35ImageForStep, Qwen3VLForStep

    return Qwen35ImageForStep if architecture == "qwen3_5" else Qwen3VLForStep


def load_text_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the text graph from the checkpoint's config and stream its weights in."""
    model_class = text_model_class(checkpoint.architecture)
    cfg = model_class.config_class.from_hf(checkpoint.text_config, checkpoint.tie_word_embeddings)
    model = model_class(cfg).to(dtype)
    if cfg.tie_word_embeddings:
        model.tie_head()  # .to() may have re-created the parameters
    load_weights(model, checkpoint.text_tensors(), checkpoint.path)
    return model.eval()
