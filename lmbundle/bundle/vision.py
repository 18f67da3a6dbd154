"""The vision half of an image-text bundle as it is read back: the `vision` section of metadata.json
(`read_vision`), the image preprocessing constants (`ImageSpec`) and the encoder (`load_bundle_encoder`).

One bundle folder carries both halves; Apple's LanguageBundle loader accepts an optional top-level
`vision` key, so the section lives there. It records everything the runtime needs to turn an image
into decoder inputs (fixed grid, patch/merge sizes, mean/std, image token ids, how many images a
prompt may hold, the encoder's config and output shapes), so loading never reads the checkpoint's
configs again and nothing is guessed from tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import LmbundleError
from ..models.vision import VisionConfig, VisionEncoder
from .format import METADATA, Bundle
from .load import read_safetensors

DEFAULT_IMAGE_SIZE = 448
VISION_WEIGHTS = "vision.safetensors"


@dataclass(frozen=True)
class ImageSpec:
    """Everything preprocessing needs, read from the checkpoint (config.json + preprocessor_config.json)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    image_size: int = DEFAULT_IMAGE_SIZE

    def __post_init__(self):
        unit = self.patch_size * self.merge_size
        if self.image_size % unit:
            raise LmbundleError(
                f"image size {self.image_size} is not a multiple of patch_size x merge_size = {unit}"
            )

    @property
    def grid_side(self) -> int:
        """Patches per side (28 for 448 / 16)."""
        return self.image_size // self.patch_size

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return (1, self.grid_side, self.grid_side)

    @property
    def num_patches(self) -> int:
        return self.grid_side**2

    @property
    def num_tokens(self) -> int:
        """Tokens the image becomes in the text sequence (196 for 448)."""
        return self.num_patches // self.merge_size**2

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class VisionInfo:
    """The `vision` section of a bundle, read back."""

    spec: ImageSpec
    encoder_config: dict[str, Any]
    weights: Path
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    max_images: int
    out_hidden_size: int
    num_deepstack: int
    merged_grid: tuple[int, int]

    @property
    def tokens_per_image(self) -> int:
        return self.merged_grid[0] * self.merged_grid[1]


def read_vision(bundle: Bundle) -> VisionInfo | None:
    """The bundle's vision section, or None for a text-only bundle."""
    section = bundle.metadata.get("vision")
    if section is None:
        return None
    where = bundle.path / METADATA
    try:
        spec = ImageSpec(
            patch_size=section["patch_size"], temporal_patch_size=section["temporal_patch_size"],
            merge_size=section["merge_size"], mean=tuple(section["image_mean"]), std=tuple(section["image_std"]),
            rescale_factor=section["rescale_factor"], resample=section["resample"], image_size=section["image_size"],
        )
        info = VisionInfo(
            spec=spec, encoder_config=dict(section["encoder"]), weights=bundle.path / section["weights"],
            image_token_id=section["image_token_id"], vision_start_token_id=section["vision_start_token_id"],
            vision_end_token_id=section["vision_end_token_id"], max_images=section["max_images"],
            out_hidden_size=section["out_hidden_size"], num_deepstack=section["num_deepstack"],
            merged_grid=tuple(section["merged_grid"]),
        )
    except (KeyError, TypeError) as exc:
        raise LmbundleError(f"{where}: incomplete vision section ({exc})") from None
    if not info.tokens_per_image == spec.num_tokens == section.get("tokens_per_image", spec.num_tokens):
        raise LmbundleError(f"{where}: vision section disagrees with itself (grid vs tokens per image)")
    return info


def load_bundle_encoder(
    bundle: Bundle, info: VisionInfo, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> VisionEncoder:
    """Build the encoder from the vision section and load `vision.safetensors` (sha256-checked)."""
    if verify:
        bundle.verify([str(info.weights.relative_to(bundle.path))])
    fields = dict(info.encoder_config)
    fields["deepstack_visual_indexes"] = tuple(fields.get("deepstack_visual_indexes") or ())
    try:
        config = VisionConfig(**fields)
    except TypeError as exc:
        raise LmbundleError(f"{bundle.path / METADATA}: bad vision encoder config ({exc})") from None
    encoder = VisionEncoder(config, info.spec.grid_side)
    read_safetensors(encoder, info.weights)
    return encoder.to(device=device, dtype=dtype).eval()
