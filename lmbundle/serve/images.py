"""Image URLs of chat messages -> validated PIL images.

Only data URLs and, when the operator allows folders, file:// URLs inside them: the server never
fetches from the network on a client's behalf. Size limits are checked before decoding.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..engine.image import declared_size, load_image
from ..errors import LmbundleError

MAX_IMAGE_BYTES = 20 * 1024 * 1024


class ImageError(LmbundleError):
    """The client sent an image we cannot use (HTTP 400)."""


def decode_image_url(url: str, allowed_dirs: list[Path]) -> Image.Image:
    data, name = image_bytes(url, allowed_dirs)
    return decode_bytes(data, name)


def image_bytes(url: str, allowed_dirs: list[Path]) -> tuple[bytes, str]:
    """The encoded bytes of an image URL and a name for messages; sizes checked, nothing decoded."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        return _data_url_bytes(url), "data URL image"
    if url.startswith("file:"):
        path = _allowed_file(url, allowed_dirs)
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: {size / 2**20:.1f} MB, over the {MAX_IMAGE_BYTES // 2**20} MB image limit")
        return path.read_bytes(), str(path)
    scheme = url.split(":", 1)[0][:16]
    raise ImageError(f"unsupported image URL scheme {scheme!r}: send the image inline as a data URL "
                     "(data:image/png;base64,...); this server does not fetch URLs")


def check_header(data: bytes, name: str) -> tuple[int, int]:
    """The declared pixel size from the image's header (PIL reads no pixels for this), checked against
    the megapixel limit: a small file that would decode to gigabytes is refused here."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: {len(data) / 2**20:.1f} MB, over the {MAX_IMAGE_BYTES // 2**20} MB image limit")
    try:
        return declared_size(data, name)
    except LmbundleError as exc:
        raise ImageError(str(exc)) from None


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ImageError("image data URL must be base64: data:image/<type>;base64,<data>")
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES + 3:
        raise ImageError(f"image is about {len(payload) * 3 / 4 / 2**20:.1f} MB, "
                         f"over the {MAX_IMAGE_BYTES // 2**20} MB image limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64") from None


def _allowed_file(url: str, allowed_dirs: list[Path]) -> Path:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageError(f"file URL with a host ({parsed.netloc!r}) is not supported")
    if not allowed_dirs:
        raise ImageError("file:// image URLs are disabled on this server (start it with --allow-files DIR)")
    path = Path(os.path.realpath(unquote(parsed.path)))
    if not any(path.is_relative_to(folder) for folder in allowed_dirs):
        raise ImageError(f"{path}: outside the folders this server may read images from")
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    return path


def decode_bytes(data: bytes, name: str) -> Image.Image:
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: {len(data) / 2**20:.1f} MB, over the {MAX_IMAGE_BYTES // 2**20} MB image limit")
    try:
        return load_image(data)
    except LmbundleError as exc:
        raise ImageError(str(exc).replace(f"image bytes ({len(data)} B)", name, 1)) from None


def give_back_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them after a decoded image is freed: a few hundred
    MB per large image would stay in the process's RSS). A no-op where there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def resolve_dirs(folders: list[str]) -> list[Path]:
    """Real paths of the --allow-files folders (symlinks resolved, so a link cannot lead outside)."""
    resolved = []
    for folder in folders or []:
        path = Path(os.path.realpath(folder))
        if not path.is_dir():
            raise LmbundleError(f"--allow-files {folder}: not a folder")
        resolved.append(path)
    return resolved
