"""Image preprocessing for the fixed-grid vision encoder.

The shipped encoder has static shapes, so every image is stretched to one square size (448 for
Qwen3-VL / Qwen3.5: a 28x28 patch grid, 196 merged tokens) instead of the processor's
aspect-preserving `smart_resize`. A checkpoint whose processor allows fewer pixels than 448^2 (its
`size.longest_edge`, or `max_pixels`) gets the largest square within that bound (the demo Qwen3-VL:
128, an 8x8 grid, 16 tokens), see `ImageSpec.from_configs`. Past the resize, every step reproduces the checkpoint's image
processor (transparency on white, PIL bicubic, rescale, mean/std, patch layout), so on an image
that already has the target size our `patches` equal its `pixel_values`.

Patch rows come in merge-window order: the `merge x merge` patches that the merger folds into one
token are adjacent. Each row is [channel, frame, y, x] with the single frame repeated
`temporal_patch_size` times (the encoder's Conv3d expects a clip).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lmbundle.errors import LmbundleError

MAX_MEGAPIXELS = 50
DEFAULT_IMAGE_SIZE = 448

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]


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

    @classmethod
    def from_configs(
        cls, vision_config: Mapping, processor_config: Mapping, image_size: int | None = None
    ) -> "ImageSpec":
        """Build from the `vision_config` dict of config.json and the preprocessor_config.json dict.

        `image_size` None: 448, or less where the processor's pixel bound is below 448^2 (the largest
        multiple of patch x merge whose square fits it)."""
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
        return cls(
            patch_size=patch,
            temporal_patch_size=temporal,
            merge_size=merge,
            mean=tuple(float(v) for v in processor_config["image_mean"]),
            std=tuple(float(v) for v in processor_config["image_std"]),
            rescale_factor=float(processor_config.get("rescale_factor", 1 / 255)),
            resample=int(processor_config.get("resample", Image.Resampling.BICUBIC)),
            image_size=image_size or default_image_size(processor_config, patch * merge),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, image_size: int | None = None) -> "ImageSpec":
        checkpoint = Path(checkpoint)
        config = _read_json(checkpoint / "config.json")
        if "vision_config" not in config:
            raise LmbundleError(f"{checkpoint / 'config.json'} has no vision_config: not an image-text checkpoint")
        return cls.from_configs(config["vision_config"], _processor_config(checkpoint), image_size)


def default_image_size(processor_config: Mapping, unit: int) -> int:
    """448, capped by the processor's largest pixel count (`size.longest_edge` in transformers 5,
    `max_pixels` before) and rounded down to a multiple of `unit` (patch x merge)."""
    size = processor_config.get("size")
    bound = size.get("longest_edge") if isinstance(size, Mapping) else None
    bound = bound or processor_config.get("max_pixels")
    if not isinstance(bound, (int, float)) or bound >= DEFAULT_IMAGE_SIZE**2:
        return DEFAULT_IMAGE_SIZE
    return max(unit, int(bound**0.5) // unit * unit)


@dataclass(frozen=True)
class PreparedImage:
    """Encoder input for one image."""

    patches: torch.Tensor  # [num_patches, patch_dim] float32, merge-window order
    grid_thw: tuple[int, int, int]
    source_size: tuple[int, int]  # (width, height) before resizing
    image_size: int  # the square side it was resized to

    @property
    def resized(self) -> bool:
        return self.source_size != (self.image_size, self.image_size)

    @property
    def notice(self) -> str | None:
        """One line for the user when the image was stretched, else None."""
        if not self.resized:
            return None
        w, h = self.source_size
        side = self.image_size
        return f"image resized from {w}x{h} to {side}x{side} (the encoder's fixed size; aspect ratio not kept)"


def load_image(source: ImageSource) -> Image.Image:
    """Open, validate and decode an image as RGB; any problem becomes one LmbundleError line naming it.

    The pixel count is checked from the header, before anything is decoded. EXIF orientation is not
    applied (neither does the HF processor, and parity with it is the point).
    """
    name = _describe(source)
    image = source if isinstance(source, Image.Image) else _open(source, name)
    try:
        _check_pixels(image.size, name)
    except LmbundleError:
        if image is not source:  # we opened it: close the file before refusing it
            image.close()
        raise
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise LmbundleError(f"{name}: truncated or corrupt image data ({exc})") from None
    try:
        return _to_rgb(image)
    except (OSError, ValueError) as exc:
        raise LmbundleError(f"{name}: cannot convert its {image.mode} pixels to RGB ({exc})") from None


def preprocess_image(source: ImageSource, spec: ImageSpec) -> PreparedImage:
    """Load an image and turn it into encoder patches at the spec's fixed size."""
    image = load_image(source)
    size = (spec.image_size, spec.image_size)
    source_size = image.size
    if source_size != size:
        image = image.resize(size, resample=Image.Resampling(spec.resample))
    pixels = normalize(image, spec)
    return PreparedImage(patchify(pixels, spec), spec.grid_thw, source_size, spec.image_size)


def normalize(image: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """uint8 RGB -> float32 [3, H, W]: rescale, then (x - mean) / std per channel."""
    scaled = (np.asarray(image, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())


def patchify(pixels: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """[3, H, W] -> [num_patches, 3 * T * p * p] in merge-window order, the frame repeated T times."""
    channels, height, width = pixels.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = height // p, width // p
    blocks = pixels.reshape(channels, gh // m, m, p, gw // m, m, p)
    blocks = blocks.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    clip = blocks.unsqueeze(5).expand(*blocks.shape[:5], t, p, p)  # (..., C, T, p, p)
    return clip.reshape(gh * gw, channels * t * p * p).contiguous()


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise LmbundleError(f"image file not found: {path}")
        stream = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream)
    except Image.DecompressionBombError:
        raise LmbundleError(f"{name}: image is over the {MAX_MEGAPIXELS}-megapixel limit") from None
    except UnidentifiedImageError:
        raise LmbundleError(f"{name}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise LmbundleError(f"{name}: unreadable image ({exc})") from None


def _check_pixels(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width * height > MAX_MEGAPIXELS * 1_000_000:
        raise LmbundleError(
            f"{name}: image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"over the {MAX_MEGAPIXELS}-megapixel limit"
        )
    if width == 0 or height == 0:
        raise LmbundleError(f"{name}: image is empty ({width}x{height})")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as the HF processor does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return "image"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} B)"
    return f"image {source}"


def _processor_config(checkpoint: Path) -> dict:
    """The image processor's settings: preprocessor_config.json (Hub checkpoints), else the
    `image_processor` entry of processor_config.json (what transformers 5 writes)."""
    legacy, unified = checkpoint / "preprocessor_config.json", checkpoint / "processor_config.json"
    if legacy.is_file():
        return _read_json(legacy)
    if unified.is_file() and isinstance(_read_json(unified).get("image_processor"), dict):
        return _read_json(unified)["image_processor"]
    raise LmbundleError(f"{checkpoint}: no image processor settings (preprocessor_config.json or processor_config.json)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LmbundleError(f"missing {path}") from None
    except json.JSONDecodeError as exc:
        raise LmbundleError(f"{path} is not valid JSON ({exc})") from None
