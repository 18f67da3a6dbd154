"""Reading Hugging Face checkpoints: a local folder or a hub id, streamed shard by shard.

Supported layouts are the registry's (`lmbundle.models`): `Qwen3_5ForCausalLM` (text),
`Qwen3_5ForConditionalGeneration` (text + vision tower) and `Qwen3VLForConditionalGeneration`. Tensors
are read lazily from the safetensors shards and copied straight into the preallocated graph, so the
model is never held twice in memory.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import LmbundleError
from ..models import Architecture, architecture_of, supported_hf_architectures
from ..models.vision import VISION_PREFIXES


def hub_like(source: str) -> bool:
    """Whether a source names a hub repository (owner/name), not a local path."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.startswith(".")


def resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id fetched through huggingface_hub's cache (a
    `snapshots/<commit>` folder: `hub_origin` reads the id and revision back from it)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LmbundleError(f"{path}: not a checkpoint folder (expected a folder with config.json)")
        return path
    source = str(source)
    if not hub_like(source):
        raise LmbundleError(f"{path}: no such checkpoint folder")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        reason = textwrap.shorten(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 200,
                                  placeholder=" ...")
        offline = "HF_HUB_OFFLINE is set: only the cache is read" if constants.HF_HUB_OFFLINE else \
            "HF_HUB_OFFLINE=1 reads only the cache"
        raise LmbundleError(
            f"cannot fetch hub model {source!r} (cache folder {constants.HF_HUB_CACHE}): {reason}; download it "
            f"where the hub is reachable (`hf download {source} --local-dir DIR`) and pass DIR instead ({offline})"
        ) from None


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    architecture: Architecture
    tensor_files: dict[str, Path]  # checkpoint tensor name -> shard
    hub_id: str | None = None  # where a hub checkpoint came from (None: a local folder)
    revision: str | None = None  # the hub commit it was read at

    @property
    def source_name(self) -> str:
        """What a bundle may say it came from: the hub id, else the folder's name (never a path of the
        machine that converted it)."""
        return self.hub_id or self.path.name

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
        return self.vision_config is not None and any(n.startswith(VISION_PREFIXES) for n in self.tensor_files)

    def text_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(graph name, tensor) of the text model, shard by shard."""
        sanitize = self.architecture.sanitize
        for name, tensor in self._tensors():
            graph_name = sanitize(name)
            if graph_name is not None:
                yield graph_name, tensor

    def vision_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) of the vision tower (`models.vision.sanitize` renames them)."""
        yield from self._tensors(lambda n: n.startswith(VISION_PREFIXES))

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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LmbundleError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmbundleError(f"{path}: not valid JSON ({_first_line(exc)})") from None


def _architecture(config: dict[str, Any], config_path: Path) -> Architecture:
    arch = architecture_of(config)
    if arch is None:
        found = ", ".join(config.get("architectures") or []) or f"model_type {config.get('model_type')!r}"
        raise LmbundleError(
            f"{config_path}: unsupported architecture {found} (supported: {', '.join(supported_hf_architectures())})"
        )
    return arch


def _tensor_index(folder: Path) -> dict[str, Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = read_json(index_path).get("weight_map")
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


def hub_origin(source: str | os.PathLike, folder: Path) -> tuple[str | None, str | None]:
    """(hub id, revision) when `source` named a hub checkpoint rather than a local folder."""
    if Path(source).expanduser().exists():
        return None, None
    return str(source), folder.name if folder.parent.name == "snapshots" else None


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    folder = resolve_source(source)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LmbundleError(f"{folder}: not a checkpoint (no config.json)")
    config = read_json(config_path)
    architecture = _architecture(config, config_path)
    return Checkpoint(folder, config, architecture, _tensor_index(folder), *hub_origin(source, folder))
