"""Graph definitions, one module per architecture, shared by every backend and the exporter.

The registry: each architecture module exports an `ARCHITECTURE` (its config, step model, state spec and
checkpoint-name sanitizer). Adding an architecture = one module + one line here.
"""

from __future__ import annotations

from typing import Any

from lmbundle.errors import LmbundleError

from . import qwen3vl, qwen35
from .decoder import Architecture

ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (qwen35.ARCHITECTURE, qwen3vl.ARCHITECTURE)}


def get_architecture(name: str) -> Architecture:
    """The architecture a bundle records by name."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise LmbundleError(f"unsupported architecture {name!r} (supported: {', '.join(ARCHITECTURES)})") from None


def architecture_of(config: dict[str, Any]) -> Architecture | None:
    """The architecture of a checkpoint's config.json (its `architectures`, else its `model_type`)."""
    for hf_name in config.get("architectures") or []:
        for arch in ARCHITECTURES.values():
            if hf_name in arch.hf_architectures:
                return arch
    if not config.get("architectures"):
        for arch in ARCHITECTURES.values():
            if config.get("model_type") in arch.hf_model_types:
                return arch
    return None


def supported_hf_architectures() -> list[str]:
    return [name for arch in ARCHITECTURES.values() for name in arch.hf_architectures]
