"""Writing the vision half of an image-text bundle: `vision.safetensors` and the `vision` section of
metadata.json (read back by `bundle.vision`). The weights are the encoder's own, fp16 by default
whatever the decoder's quant mode (the seeds quantize the decoder only); their sha256 goes into
`lmbundle.files` with every other file of the bundle.

Where Core AI export is available the section also names a `NAME.vision.aimodel`: the encoder as one
static function `main`, `patches` [784, 1536] fp16 in, `image_embeds` / `deepstack_embeds` fp16 out
(the seed's vision contract: one image on the fixed grid), computed at the weights' dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .. import __version__
from ..bundle.coreai import import_coreai_torch
from ..bundle.format import write_safetensors
from ..bundle.load import load_weights
from ..bundle.vision import DEFAULT_IMAGE_SIZE, VISION_WEIGHTS, ImageSpec
from ..errors import LmbundleError
from ..models.vision import VisionConfig, VisionEncoder, sanitize
from ..quiet import python_stdout_filtered
from .checkpoint import Checkpoint, open_checkpoint, read_json

VISION_IO_DTYPE = torch.float16
DEFAULT_MAX_IMAGES = 1  # image slots of the decoder's ImageContext: one image, the hosts' contract
_TOKEN_KEYS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")


def write_vision(
    checkpoint: Checkpoint, folder: Path, text_hidden: int, dtype: torch.dtype = torch.float16,
    max_images: int = DEFAULT_MAX_IMAGES, image_size: int | None = None, asset: str | None = None,
) -> dict[str, Any]:
    """Write the checkpoint's vision encoder to `folder/vision.safetensors` (and the Core AI `asset`,
    a `.aimodel` folder name, when given); returns the metadata section."""
    spec = image_spec_of(checkpoint.path, image_size)
    tokens = {key: checkpoint.config.get(key) for key in _TOKEN_KEYS}
    missing = [key for key, value in tokens.items() if not isinstance(value, int)]
    if missing:
        raise LmbundleError(f"{checkpoint.path / 'config.json'}: no {', '.join(missing)} (needed for image prompts)")
    if max_images < 1:
        raise LmbundleError(f"max_images must be at least 1, not {max_images}")
    encoder = load_vision_encoder(checkpoint, spec.grid_side, torch.float32).to(dtype)
    config = encoder.config
    if config.out_hidden_size != text_hidden:
        raise LmbundleError(
            f"{checkpoint.path}: vision out_hidden_size {config.out_hidden_size} != text hidden_size {text_hidden}"
        )
    tensors = {name: t.contiguous() for name, t in encoder.state_dict().items()}
    write_safetensors(folder / VISION_WEIGHTS, tensors, metadata={"format": "pt", "lmbundle": __version__})
    if asset:
        export_vision_aimodel(encoder, folder / asset)
    per_image = spec.num_tokens
    num_deepstack = len(config.deepstack_visual_indexes)
    merged = spec.grid_side // spec.merge_size
    return {
        "weights": VISION_WEIGHTS,
        "asset": asset,
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": spec.image_size,
        "grid_thw": list(spec.grid_thw),
        "merged_grid": [merged, merged],
        "tokens_per_image": per_image,
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.merge_size,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "rescale_factor": spec.rescale_factor,
        "resample": spec.resample,
        **tokens,
        "max_images": max_images,
        "out_hidden_size": config.out_hidden_size,
        "num_deepstack": num_deepstack,
        "encoder": dataclasses.asdict(config),
        "inputs": {"patches": [spec.num_patches, spec.patch_dim]},
        "outputs": {"image_embeds": [per_image, config.out_hidden_size],
                    "deepstack_embeds": [num_deepstack * per_image, config.out_hidden_size]},
    }


class VisionGraph(nn.Module):
    """The exported function: fp16 patches in, fp16 embeddings out (the host's buffers), whatever the
    weights' dtype."""

    def __init__(self, encoder: VisionEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds, deepstack_embeds = self.encoder(patches)
        return image_embeds.to(VISION_IO_DTYPE), deepstack_embeds.to(VISION_IO_DTYPE)


def export_vision_aimodel(encoder: VisionEncoder, out_path: Path) -> Path:
    """Write the encoder as a Core AI `.aimodel` folder (static shapes: one image on the fixed grid)."""
    coreai_torch = import_coreai_torch()
    config = encoder.config
    patches = torch.zeros(encoder.grid_side**2, config.patch_dim, dtype=VISION_IO_DTYPE)
    with torch.no_grad():
        exported = torch.export.export(VisionGraph(encoder).eval(), (patches,), strict=False)
    exported = exported.run_decompositions(coreai_torch.get_decomp_table())
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_exported_program(exported, input_names=["patches"],
                                   output_names=["image_embeds", "deepstack_embeds"])
    with python_stdout_filtered():  # its "converting 1 program(s)" line (lmbundle/quiet.py)
        program = converter.to_coreai()
    program.save_asset(Path(out_path))
    return Path(out_path)


def load_vision_encoder(
    source: Checkpoint | str | Path, grid_side: int = 28, dtype: torch.dtype = torch.float32
) -> VisionEncoder:
    """Build the encoder from a checkpoint (or its folder) and stream in its vision tensors."""
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    if not checkpoint.has_vision:
        raise LmbundleError(f"{checkpoint.path}: no vision tower (vision_config and model.visual.* tensors)")
    encoder = VisionEncoder(VisionConfig.from_hf(checkpoint.vision_config), grid_side).to(dtype)
    load_weights(encoder, sanitize(checkpoint.vision_tensors()), checkpoint.path)
    return encoder.eval()


def image_spec_of(checkpoint: str | Path, image_size: int | None = None) -> ImageSpec:
    """The preprocessing a checkpoint's image processor does, at our fixed square size (None: see
    `default_image_size`)."""
    checkpoint = Path(checkpoint)
    config = read_json(checkpoint / "config.json")
    if "vision_config" not in config:
        raise LmbundleError(f"{checkpoint / 'config.json'} has no vision_config: not an image-text checkpoint")
    return image_spec_from_configs(config["vision_config"], _processor_config(checkpoint), image_size)


def default_image_size(processor_config: Mapping, unit: int) -> int:
    """The fixed square's side: 448, or less where the processor allows fewer pixels than 448^2 (its
    `size.longest_edge` in transformers 5, `max_pixels` before): the largest multiple of `unit`
    (patch x merge) whose square fits. The demo Qwen3-VL's bound is 128^2: 128, 8x8 patches, 16 tokens."""
    size = processor_config.get("size")
    bound = size.get("longest_edge") if isinstance(size, Mapping) else None
    bound = bound or processor_config.get("max_pixels")
    if not isinstance(bound, (int, float)) or bound >= DEFAULT_IMAGE_SIZE**2:
        return DEFAULT_IMAGE_SIZE
    return max(unit, int(bound**0.5) // unit * unit)


def image_spec_from_configs(
    vision_config: Mapping, processor_config: Mapping, image_size: int | None = None
) -> ImageSpec:
    """From the `vision_config` dict of config.json and the preprocessor_config.json dict."""
    patch = vision_config.get("patch_size", 16)
    merge = vision_config.get("spatial_merge_size", 2)
    temporal = vision_config.get("temporal_patch_size", 2)
    for key, model_value in (("patch_size", patch), ("merge_size", merge), ("temporal_patch_size", temporal)):
        if key in processor_config and processor_config[key] != model_value:
            raise LmbundleError(
                f"preprocessor_config.json {key}={processor_config[key]} disagrees with the vision config ({model_value})"
            )
    for key in ("image_mean", "image_std"):
        if key not in processor_config:
            raise LmbundleError(f"preprocessor_config.json has no {key}")
    return ImageSpec(
        patch_size=patch,
        temporal_patch_size=temporal,
        merge_size=merge,
        mean=tuple(float(v) for v in processor_config["image_mean"]),
        std=tuple(float(v) for v in processor_config["image_std"]),
        rescale_factor=float(processor_config.get("rescale_factor", 1 / 255)),
        resample=int(processor_config.get("resample", Image.Resampling.BICUBIC)),
        image_size=image_size or default_image_size(processor_config, patch * merge),
    )


def _processor_config(checkpoint: Path) -> dict:
    """The image processor's settings: preprocessor_config.json (Hub checkpoints), else the
    `image_processor` entry of processor_config.json (what transformers 5 writes)."""
    legacy, unified = checkpoint / "preprocessor_config.json", checkpoint / "processor_config.json"
    if legacy.is_file():
        return read_json(legacy)
    if unified.is_file() and isinstance(read_json(unified).get("image_processor"), dict):
        return read_json(unified)["image_processor"]
    raise LmbundleError(f"{checkpoint}: no image processor settings (preprocessor_config.json or processor_config.json)")

