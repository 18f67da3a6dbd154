"""Image preprocessing for the fixed-grid vision encoder (the sizes and constants: `bundle.vision.ImageSpec`).

The shipped encoder has static shapes, so every image is stretched to one square size (448 for
Qwen3-VL / Qwen3.5: a 28x28 patch grid, 196 merged tokens) instead of the processor's
aspect-preserving `smart_resize`. Past the resize, every step reproduces the checkpoint's image
processor (transparency on white, PIL bicubic, rescale, mean/std, patch layout), so on an image
that already has the target size our `patches` equal its `pixel_values`.

Patch rows come in merge-window order: the `merge x merge` patches that the merger folds into one
token are adjacent. Each row is [channel, frame, y, x] with the single frame repeated
`temporal_patch_size` times (the encoder's Conv3d expects a clip).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..bundle.vision import ImageSpec
from ..errors import LmbundleError

MAX_MEGAPIXELS = 50

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]


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


def declared_size(source: ImageSource, name: str | None = None) -> tuple[int, int]:
    """(width, height) from the image's header, checked against the megapixel limit; no pixel is
    decoded, so a small file that would decode to gigabytes is refused here."""
    name = name or _describe(source)
    if isinstance(source, Image.Image):
        size = source.size
    else:
        with _open(source, name) as image:
            size = image.size
    _check_pixels(size, name)
    return size


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
