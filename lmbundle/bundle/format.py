"""The bundle format: a folder with metadata.json, tokenizer/, weights.safetensors and NAME.aimodel.

metadata.json is a superset of Apple's LanguageBundle schema 0.2 (so Apple's tools can read it) with our
own `lmbundle` section: architecture and config, quant recipe, state layout, inputs/outputs, bytes read
per token, the sha256 of every file, and `content_sha256`: the sha256 of everything in metadata.json
that decides what a loader computes (config, recipe, state and I/O layout, assets, the file hashes),
checked by `open_bundle`, so a hand edit of the config cannot make `run` compute another model. Bundles
are written to a temporary folder beside the target and renamed into place at the end, so a failed or
interrupted convert leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import LmbundleError
from ..models.image_prompt import ImageContext
from ..models.state import State

BUNDLE_VERSION = 2  # 2: metadata.json carries content_sha256
METADATA = "metadata.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_PATTERNS = (
    "tokenizer*.json", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
    "chat_template*", "*.jinja", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "generation_config.json", "*.model", "*.tiktoken",
)


# The exported step's names (the seed's contract): one Core AI state per `State` field (a pure-attention
# decoder has no GDN state, so no convState/recState), and the image inputs are an `ImageContext`'s tensors.
_COREAI_STATE_NAMES = {"conv": "convState", "rec": "recState", "key": "keyCache", "value": "valueCache"}
STATE_NAMES = {f.name: _COREAI_STATE_NAMES[f.name] for f in fields(State)}
IMAGE_INPUT_NAMES = tuple(f.name for f in fields(ImageContext) if f.name != "grid")
STEP_INPUT_NAMES = ("input_ids", "position_ids")
STEP_OUTPUT_NAMES = ("logits", "next_token")

_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.int32: "I32",
    torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time: `safetensors.torch.save_file` first copies every
    tensor into one bytes object, which for a 2B model would double the memory a convert needs."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors.values():
            handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path, skip: tuple[str, ...] = (METADATA,)) -> dict[str, str]:
    """sha256 of every file under root (relative paths), metadata.json itself excluded."""
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def copy_tokenizer(checkpoint: Path, dest: Path) -> list[str]:
    """Copy the checkpoint's tokenizer files (chat template and processor config included) as they are."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for src in checkpoint.glob(pattern):
            if src.is_file() and not (dest / src.name).exists():
                shutil.copy2(src, dest / src.name)
                copied.append(src.name)
    if not any(name.startswith("tokenizer") for name in copied):
        raise LmbundleError(f"{checkpoint}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return sorted(copied)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it becomes `out` only if the block finishes."""
    out = Path(out)
    if out.exists():
        raise LmbundleError(f"{out}: already exists (remove it or choose another output folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def language_bundle_metadata(
    name: str, vocab_size: int, max_context: int, hf_model_id: str | None, compression: dict | None,
    aimodel: str | None,
) -> dict[str, Any]:
    """The keys Apple's LanguageBundle loader (schema 0.2) reads."""
    return {
        "metadata_version": "0.2",
        "kind": "llm",
        "name": name,
        "assets": {"main": aimodel} if aimodel else {},
        "language": {
            "tokenizer": TOKENIZER_DIR,
            "vocab_size": vocab_size,
            "max_context_length": max_context,
            "embedded_tokenizer": True,
            "function_map": {"main": ["main"]},
        },
        "source": {"model_definition": "torch", "hf_model_id": hf_model_id, "hf_revision": None},
        "compression": compression,
        "compilation": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "targets": []},
    }


_CONTENT_KEYS = ("bundle_version", "architecture", "config", "hf_config", "quant", "weights", "state", "inputs",
                 "outputs", "files")


def content_digest(metadata: dict[str, Any]) -> str:
    """sha256 of metadata.json's meaningful content (canonical JSON): the `lmbundle` keys a loader reads,
    the LanguageBundle `language` and `assets` sections and the `vision` section."""
    info = metadata.get("lmbundle", {})
    content = {"lmbundle": {k: info.get(k) for k in _CONTENT_KEYS},
               **{k: metadata.get(k) for k in ("language", "assets", "vision")}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    metadata["lmbundle"]["files"] = hash_tree(folder)
    metadata["lmbundle"]["size_on_disk"] = sum((folder / f).stat().st_size for f in metadata["lmbundle"]["files"])
    metadata["lmbundle"]["content_sha256"] = content_digest(metadata)
    (folder / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")


@dataclass
class Bundle:
    path: Path
    metadata: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        return self.metadata["lmbundle"]

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def max_context(self) -> int:
        return int(self.metadata["language"]["max_context_length"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def aimodel_path(self) -> Path | None:
        asset = self.metadata.get("assets", {}).get("main")
        return self.path / asset if asset else None

    def tokenizer_files(self) -> list[str]:
        """The tokenizer files the bundle records (relative paths)."""
        return [rel for rel in self.info.get("files", {}) if rel.startswith(f"{TOKENIZER_DIR}/")]

    def load_tokenizer(self, verify: bool = True):
        """The bundle's tokenizer (transformers), its files checked against their sha256 first; a missing
        folder or tokenizer.json is one line."""
        folder = self.tokenizer_path
        if not folder.is_dir():
            raise LmbundleError(f"{folder}: missing (the bundle has no tokenizer folder; convert the checkpoint again)")
        has_vocab = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file() or any(folder.glob("*.model"))
        if not has_vocab:
            raise LmbundleError(f"{folder / 'tokenizer.json'}: missing from the bundle's tokenizer folder")
        if verify:
            self.verify(self.tokenizer_files())
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:
            text = str(exc).strip()
            reason = text.splitlines()[0][:200] if text else type(exc).__name__
            raise LmbundleError(f"{folder}: cannot load tokenizer ({reason})") from None

    def verify(self, files: list[str] | None = None) -> None:
        """Check the sha256 of the named files (all by default) against metadata.json."""
        recorded = self.info.get("files", {})
        for rel in files or list(recorded):
            path = self.path / rel
            if rel not in recorded:
                raise LmbundleError(f"{path}: not listed in {self.path / METADATA}")
            if not path.exists():
                raise LmbundleError(f"{path}: missing from the bundle")
            if sha256_file(path) != recorded[rel]:
                raise LmbundleError(f"{path}: sha256 does not match metadata.json (damaged or modified bundle)")


def open_bundle(path: str | os.PathLike) -> Bundle:
    path = Path(path).expanduser()
    meta_path = path / METADATA
    if not path.is_dir():
        raise LmbundleError(f"{path}: no such bundle folder")
    if not meta_path.exists():
        raise LmbundleError(f"{path}: not a bundle (no {METADATA})")
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmbundleError(f"{meta_path}: not valid JSON ({exc})") from None
    info = metadata.get("lmbundle") if isinstance(metadata, dict) else None
    if not isinstance(info, dict):
        raise LmbundleError(f"{meta_path}: not an lmbundle bundle (no 'lmbundle' section)")
    version = info.get("bundle_version")
    if version != BUNDLE_VERSION:
        raise LmbundleError(
            f"{meta_path}: bundle version {version} is not supported by lmbundle {__version__} "
            f"(expects {BUNDLE_VERSION}); convert the checkpoint again"
        )
    recorded = info.get("content_sha256")
    if recorded is None:
        raise LmbundleError(f"{meta_path}: no content_sha256 (an older lmbundle wrote it); convert the checkpoint again")
    if recorded != content_digest(metadata):
        raise LmbundleError(f"{meta_path}: content does not match its content_sha256 (edited or damaged: "
                            "config, recipe, layout or file hashes changed); convert the checkpoint again")
    return Bundle(path, metadata)
