"""`lmbundle convert`: checkpoint -> bundle (read back by `bundle.load.load_graph`)."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import __version__
from ..bundle.format import (
    BUNDLE_VERSION,
    ENTRY_POINTS,
    IMAGE_INPUT_NAMES,
    PREFILL_CHUNK,
    STATE_NAMES,
    WEIGHTS,
    atomic_folder,
    copy_tokenizer,
    language_bundle_metadata,
    write_metadata,
    write_safetensors,
)
from ..bundle.load import build_graph, load_weights
from ..bundle.quant import bytes_per_token, check_mode, quantize_model
from ..errors import LmbundleError
from ..models.decoder import DecoderForStep
from ..models.state import GROWING_STATES
from .checkpoint import Checkpoint, open_checkpoint
from .vision_export import DEFAULT_MAX_IMAGES, write_vision

EXPORT_TARGETS = ("all", "torch", "coreai")  # what a bundle carries: both graphs, or one
DEFAULT_MAX_CONTEXT = 4096


def coreai_available() -> str | None:
    """None if the Core AI exporter can run here, else the reason it cannot."""
    if importlib.util.find_spec("coreai_torch") is None or importlib.util.find_spec("coreai") is None:
        return "coreai-core / coreai-torch are not installed (pip install 'lmbundle[coreai]'; Linux x86_64 or macOS)"
    return None


def _checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def load_checkpoint_graph(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> DecoderForStep:
    """The checkpoint's text graph with its weights, in `dtype` (GDN parameters and norms stay fp32)."""
    arch = checkpoint.architecture
    cfg = arch.config.from_hf(checkpoint.text_config, checkpoint.tie_word_embeddings)
    model = build_graph(arch.model, cfg, dtype)
    load_weights(model, checkpoint.text_tensors(), checkpoint.path)
    return model.eval()


def image_inputs(vision: dict[str, Any]) -> dict[str, list[int]]:
    """The decoder's static image inputs (the seed's VLM contract), sized by the vision section."""
    slots, hidden = vision["max_images"] * vision["tokens_per_image"], vision["out_hidden_size"]
    shapes = ([slots, hidden], [vision["num_deepstack"] * slots, hidden], [vision["max_images"]],
              [vision["max_images"]])
    return dict(zip(IMAGE_INPUT_NAMES, shapes, strict=True))


def state_layout(model: torch.nn.Module, capacity: int) -> dict[str, Any]:
    state = model.new_state(capacity, device="meta")
    return {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
               "grows": name in GROWING_STATES}
        for name, t in state.tensors().items()
    }


def convert(
    source: str,
    out: str | os.PathLike,
    quant: str = "int8hu",
    head_quant: str = "block32",
    backend: str = "all",
    max_context: int = DEFAULT_MAX_CONTEXT,
    name: str | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    log=print,
) -> Path:
    """Convert a checkpoint folder or hub id into a bundle at `out` (atomically). `max_images`: the image
    slots of a VLM decoder (one image is the hosts' contract; more is ours alone)."""
    check_mode(quant, head_quant)
    if backend not in EXPORT_TARGETS:
        raise LmbundleError(f"unknown backend {backend!r} (choose one of {', '.join(EXPORT_TARGETS)})")
    out = Path(out)
    if out.exists():
        raise LmbundleError(f"{out}: already exists (remove it or choose another output folder)")
    ckpt = open_checkpoint(source)
    name = name or re.sub(r"[^\w.-]+", "_", f"{ckpt.path.name}_{quant}")
    coreai_reason = coreai_available() if backend in ("all", "coreai") else "not requested"
    if backend == "coreai" and coreai_reason:
        raise LmbundleError(f"cannot export .aimodel: {coreai_reason}")
    steps = ["load", "quantize", "write weights", "tokenizer"] + ([] if coreai_reason else ["export .aimodel"])
    with atomic_folder(out) as tmp:
        progress = tqdm(total=len(steps), desc=f"convert {name}", unit="step", disable=log is None)
        progress.set_postfix_str("load")
        model = load_checkpoint_graph(ckpt, _checkpoint_dtype(ckpt.config))
        cfg = model.cfg
        progress.update()

        progress.set_postfix_str("quantize")
        recipe = quantize_model(model, quant, head_quant)
        gc.collect()
        progress.update()

        progress.set_postfix_str("write weights")
        if backend != "coreai":  # a Core AI-only bundle carries its weights in the .aimodel alone
            tensors = dict(model.state_dict())
            if recipe["tied_head"]:
                tensors.pop("lm_head.weight", None)
            write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt", "lmbundle": __version__})
            del tensors
        progress.update()

        progress.set_postfix_str("tokenizer")
        copy_tokenizer(ckpt.path, tmp / "tokenizer")
        vision_asset = None if coreai_reason else f"{name}.vision.aimodel"
        vision = write_vision(ckpt, tmp, cfg.hidden_size, max_images=max_images,
                              asset=vision_asset) if ckpt.has_vision else None
        progress.update()

        aimodel = None
        if not coreai_reason:
            from .coreai_export import export_aimodel

            progress.set_postfix_str("export .aimodel")
            aimodel = f"{name}.aimodel"
            exported = export_aimodel(model, max_context, tmp / aimodel, vision=vision)
            progress.update()
        progress.close()
        if coreai_reason and backend == "all" and log:
            log(f"note: no .aimodel in this bundle: {coreai_reason}")

        compression = None if quant == "fp16" else {"scheme": quant, "granularity": "per_block_32",
                                                    "head": recipe["head"], "symmetric": "absmax"}
        metadata = language_bundle_metadata(name, cfg.vocab_size, max_context, ckpt.source_name, ckpt.revision,
                                            compression, aimodel)
        metadata["lmbundle"] = {
            "bundle_version": BUNDLE_VERSION,
            "lmbundle_version": __version__,
            "architecture": ckpt.architecture.name,
            "config": dataclasses.asdict(cfg),
            "hf_config": {k: v for k, v in ckpt.config.items() if k != "_name_or_path"},  # no build paths
            "quant": recipe,
            "weights": None if backend == "coreai" else WEIGHTS,
            "state": state_layout(model, max_context),
            "inputs": {"input_ids": [1, 1], "position": [1]} | (image_inputs(vision) if vision else {}),
            "outputs": {"logits": [1, 1, cfg.vocab_size], "next_token": [1, 1]},
            "bytes_per_token": bytes_per_token(model),
        }
        if aimodel:
            apple_language_keys(metadata, model, exported.functions)
        if vision:
            apple_vision_keys(metadata, vision)
        write_metadata(tmp, metadata)
        if aimodel:
            from ..bundle.check import check_bundle
            from ..bundle.hosts import SHIP_HOST

            report = check_bundle(tmp, hosts=[SHIP_HOST])
            slots = {f"input {n}" for n in IMAGE_INPUT_NAMES} if max_images > 1 else set()
            failures = [r for r in report.failures() if r.name not in slots]  # more images: the user's choice
            if failures:
                failed = "; ".join(f"{r.name}: {r.detail}" for r in failures)
                raise LmbundleError(f"{out}: the bundle would not run on the {SHIP_HOST} host ({failed})")
            if slots and log:
                log(f"note: {max_images} image slots: lmbundle's engines take them; the {SHIP_HOST} host feeds one image")
    return out


APPLE_STATE_NAMES = {"conv": "convStates", "rec": "recurrentStates"}  # Apple's own Qwen3.5 export, where ours differ


def apple_language_keys(metadata: dict[str, Any], model: torch.nn.Module, functions: list[str]) -> None:
    """What Apple's loader reads beyond the base schema: the state kinds (KV grows, GDN states are fixed),
    the entry points of the asset, and the prompt chunking (#240): the `prefill` function takes up to
    PREFILL_CHUNK tokens, `main` one, so every prompt longer than one token is chunked."""
    state = model.new_state(1, device="meta")
    present = [f for f in STATE_NAMES if state.tensors()[f].numel()]
    language = metadata["language"]
    language["states"] = {STATE_NAMES[f]: "kv_cache" if f in GROWING_STATES else "fixed" for f in present}
    language["function_map"] = {f: [f] for f in ENTRY_POINTS if f in functions}
    if len(language["function_map"]) > 1:
        language["prefill_chunk_size"] = PREFILL_CHUNK
        language["prefill_chunk_threshold"] = 1
    metadata["lmbundle"]["apple_state_names"] = {STATE_NAMES[f]: APPLE_STATE_NAMES.get(f, STATE_NAMES[f])
                                                 for f in present}
    metadata["lmbundle"]["coreai_kv"] = "dynamic"  # the asset's KV length is -1: grown by the host up to max_context


def apple_vision_keys(metadata: dict[str, Any], vision: dict[str, Any]) -> None:
    """A VLM bundle stays `kind: llm` (the seed's host contract: the decoder is a LanguageBundle and the
    host feeds the image inputs); its vision section carries the keys Apple's VisionConfig decodes
    (image_token_count, image_strategy beside ours), and the encoder asset is also `assets.vision`."""
    vision.setdefault("image_token_count", vision["tokens_per_image"])
    vision.setdefault("image_strategy", "stretch")
    if vision.get("asset"):
        metadata["assets"]["vision"] = vision["asset"]
    metadata["vision"] = vision
