"""Image prompts at run time: images -> encoder -> the decoder's per-prompt image inputs.

The decoder reads its image inputs from one `ImageContext` that is allocated once, set on the graph
once, and only ever written in place (`copy_`): a CUDA-graph-captured step keeps pointing at the
same tensors for the life of the engine. A text prompt writes the "no images" values (zero embeds,
shift start 2^30, amount 0), which leave the text path bit-identical to a graph with no context.

Flow: `attach` prepares images (stretch to the fixed grid; the resize notice is shown once),
`image_prompt` turns the chat template's ids (one placeholder per image) into the decoder's ids
(T = gh * gw slots per image) and keeps the prompt's context pending; `activate`, called by the
engine before every prefill, writes the pending context for that prompt (or the empty one).
Each distinct image is encoded once (keyed by the sha256 of its patches). A backend that keeps its
own copy of the image inputs (Core AI) sets `on_write`, called with the context after each change.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..bundle.format import Bundle
from ..bundle.vision import VisionInfo, load_bundle_encoder, read_vision
from ..errors import LmbundleError
from ..models.image_prompt import NO_SHIFT_START, ImageContext, prepare_image_prompt
from .image import ImageSource, PreparedImage, preprocess_image

CACHE_IMAGES = 16  # encoded images kept (LRU); a 2B image is 196 x 2048 x 4 levels x fp32 = 6.4 MB


def _stderr_note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def split_images(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """Chat messages -> (messages the template can render, images in prompt order).

    Image parts ({"type": "image", "image": <path | bytes | PIL | PreparedImage>}) become bare
    {"type": "image"}: templates only need to know where an image goes, not its pixels.
    """
    rendered, images = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                if "image" not in part:
                    raise LmbundleError("an image part of a chat message has no 'image'")
                images.append(part["image"])
                parts.append({"type": "image"})
            else:
                parts.append(part)
        rendered.append({**message, "content": parts})
    return rendered, images


class ImagePrompts:
    """The vision encoder of a bundle and the decoder's persistent ImageContext."""

    def __init__(self, bundle: Bundle, info: VisionInfo, vocab_size: int, device: torch.device,
                 context_dtype: torch.dtype, verify: bool = True):
        self.info, self.vocab_size, self.max_context = info, vocab_size, bundle.max_context
        self.encoder = load_bundle_encoder(bundle, info, device, torch.float32, verify)
        self.context = ImageContext.empty(info.out_hidden_size, info.max_images, info.merged_grid,
                                          info.num_deepstack, context_dtype, device)
        self._active: ImageContext | None = None  # what the persistent context holds now (None: empty)
        self._pending: tuple[tuple[int, ...], ImageContext] | None = None
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._noticed: set[str] = set()
        self.encode_seconds: list[float] = []  # one entry per image actually encoded (cache misses)
        self.on_write: Callable[[ImageContext], None] | None = None

    @classmethod
    def for_bundle(cls, bundle: Bundle, device: torch.device, context_dtype: torch.dtype,
                   verify: bool = True) -> "ImagePrompts | None":
        """None for a text-only bundle."""
        info = read_vision(bundle)
        if info is None:
            return None
        return cls(bundle, info, int(bundle.info["config"]["vocab_size"]), device, context_dtype, verify)

    # -- images -----------------------------------------------------------------------------------
    def prepare(self, source: ImageSource | PreparedImage) -> PreparedImage:
        if isinstance(source, PreparedImage):
            if source.patches.shape != (self.info.spec.num_patches, self.info.spec.patch_dim):
                raise LmbundleError(f"prepared image has patches {tuple(source.patches.shape)}; this bundle's "
                                    f"encoder takes {(self.info.spec.num_patches, self.info.spec.patch_dim)}")
            return source
        return preprocess_image(source, self.info.spec)

    def attach(self, sources: Sequence[ImageSource], notify: Callable[[str], None] | None = _stderr_note) -> list[dict]:
        """Prepare images as chat content parts; each distinct resize notice goes to `notify` once."""
        parts = []
        for source in sources:
            prepared = self.prepare(source)
            if prepared.notice and prepared.notice not in self._noticed:
                self._noticed.add(prepared.notice)
                if notify:
                    notify(prepared.notice)
            parts.append({"type": "image", "image": prepared})
        return parts

    @torch.inference_mode()
    def encode(self, source: ImageSource | PreparedImage) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds [T, H], deepstack_embeds [n * T, H]) fp32, from the cache when seen before."""
        prepared = self.prepare(source)
        key = hashlib.sha256(prepared.patches.numpy().tobytes()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        start = time.perf_counter()
        device = self.context.image_embeds.device
        embeds, deepstack = self.encoder(prepared.patches.to(device))
        result = (embeds.float(), deepstack.float())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.encode_seconds.append(time.perf_counter() - start)
        self._cache[key] = result
        if len(self._cache) > CACHE_IMAGES:
            self._cache.popitem(last=False)
        return result

    # -- prompts ----------------------------------------------------------------------------------
    def image_prompt(self, ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], ImageContext | None]:
        """Template ids with one image placeholder per image -> the decoder's ids (image tokens
        rewritten to vocab + slot) and the prompt's image context (also kept for `activate`)."""
        info = self.info
        per_image = info.tokens_per_image
        found = sum(1 for t in ids if t == info.image_token_id)
        if found != len(images):
            raise LmbundleError(
                f"the prompt has {found} image placeholder(s) for {len(images)} image(s): the chat template "
                "must put one <|image_pad|> where each image goes"
            )
        if len(images) > info.max_images:
            raise LmbundleError(f"{len(images)} images in one prompt; this bundle takes at most {info.max_images}")
        length = len(ids) + len(images) * (per_image - 1)
        if length > self.max_context:
            raise LmbundleError(
                f"context too long: {len(images)} image(s) x {per_image} tokens + text = {length} prompt tokens "
                f"> the bundle's maximum of {self.max_context}"
            )
        expanded = []
        for t in ids:
            expanded.extend([t] * per_image if t == info.image_token_id else [t])
        encoded = [self.encode(image) for image in images]
        new_ids, context = prepare_image_prompt(expanded, info.image_token_id, self.vocab_size, encoded,
                                                info.merged_grid, info.max_images)
        new_ids = new_ids.tolist()
        self._pending = (tuple(new_ids), context) if context is not None else None
        return new_ids, context

    def activate(self, ids: Sequence[int], context: ImageContext | None = None) -> None:
        """Before a prefill: the persistent context gets this prompt's images (`context`, else those of the
        last image prompt made for these ids), or none, in place."""
        if not ids or max(ids) < self.vocab_size:
            self._write(None)
            return
        if context is None and self._pending is not None and self._pending[0] == tuple(ids):
            context = self._pending[1]
        if context is None:
            raise LmbundleError("the prompt holds image tokens but not the images they belong to "
                                "(build image prompts with chat_ids)")
        self._write(context)

    def _write(self, source: ImageContext | None) -> None:
        if source is self._active:
            return
        target = self.context
        if source is None:
            target.image_embeds.zero_()
            target.deepstack_embeds.zero_()
            target.rope_shift_start.fill_(NO_SHIFT_START)
            target.rope_shift_amount.zero_()
        else:
            for name, tensor in target.tensors().items():
                tensor.copy_(source.tensors()[name])
        self._active = source
        if self.on_write is not None:
            self.on_write(target)
