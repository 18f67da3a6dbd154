"""Image prompts in a text step graph (Qwen3-VL, and Qwen3.5 with a vision tower).

Images reach a text-only step graph through the id space, as in the seed: the host rewrites the
k-th image placeholder of the prompt to id `vocab + k` and sets four static inputs once per prompt
(`ImageContext`). In the graph a token's embedding is the table row if id < vocab, else
`image_embeds[id - vocab]`; after decoder layer l < n_deepstack, image tokens add
`deepstack_embeds[l * slots + id - vocab]`.

Interleaved M-RoPE positions are derived in the graph from (id, sequence position) and a per-image
shift table. Image k spans T = gh * gw tokens but advances the rope position by only max(gh, gw),
so every token after it is shifted back by T - max(gh, gw). With shift(i) = sum of the amounts of
images that ended at or before sequence index i (`rope_shift_start[k]` = end of image k,
`rope_shift_amount[k]` = its shift; unused entries start at 2^30 with amount 0):
  text token:  t = h = w = i - shift(i)
  image token (slot s within its image):  base = i - s - shift(i); (t, h, w) = (base, base + s // gw, base + s % gw)
which equals transformers' `get_rope_index` for any mix of text and images, decode steps included
(their `past_len + rope_delta` is the text rule). The KV cache slot and causal mask keep the
sequence index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from lmbundle.errors import LmbundleError

NO_SHIFT_START = 2**30  # "this image slot is unused": no sequence index reaches it


@dataclass
class ImageContext:
    """The per-prompt static inputs of the decoder for up to M images of T = gh * gw tokens each."""

    image_embeds: torch.Tensor  # [M * T, hidden]
    deepstack_embeds: torch.Tensor  # [n_deepstack * M * T, hidden], row l * M * T + slot
    rope_shift_start: torch.Tensor  # [M] int32: sequence index just past image k
    rope_shift_amount: torch.Tensor  # [M] int32: T - max(gh, gw) for a used slot, else 0
    grid: tuple[int, int]  # (gh, gw) merged tokens per image side: (14, 14) for 448x448

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def slots(self) -> int:
        return self.image_embeds.shape[0]

    @property
    def num_deepstack(self) -> int:
        return self.deepstack_embeds.shape[0] // self.slots

    @classmethod
    def empty(
        cls, hidden: int, max_images: int, grid: tuple[int, int], num_deepstack: int, dtype=torch.float32, device=None
    ) -> "ImageContext":
        """No images: the decoder behaves as a plain text model (the export's example inputs)."""
        slots = max_images * grid[0] * grid[1]
        return cls(
            image_embeds=torch.zeros(slots, hidden, dtype=dtype, device=device),
            deepstack_embeds=torch.zeros(num_deepstack * slots, hidden, dtype=dtype, device=device),
            rope_shift_start=torch.full((max_images,), NO_SHIFT_START, dtype=torch.int32, device=device),
            rope_shift_amount=torch.zeros(max_images, dtype=torch.int32, device=device),
            grid=grid,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four static inputs by name (every field but the grid)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "grid"}


def prepare_image_prompt(
    ids: Sequence[int] | torch.Tensor,
    image_token_id: int,
    vocab_size: int,
    images: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grid: tuple[int, int],
    max_images: int | None = None,
) -> tuple[torch.Tensor, ImageContext | None]:
    """Host side of an image prompt: rewrite placeholders to `vocab + slot` and build the ImageContext.

    `ids` hold T = gh * gw image_token_id placeholders per image, in the order of `images`, each a
    (image_embeds [T, hidden], deepstack_embeds [n_deepstack * T, hidden]) pair from the encoder.
    With no images the context is None (text only).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).clone()
    per_image = grid[0] * grid[1]
    max_images = max_images or max(len(images), 1)
    placeholders = (ids == image_token_id).nonzero().flatten()
    if placeholders.numel() != per_image * len(images):
        raise LmbundleError(
            f"prompt has {placeholders.numel()} image placeholder tokens; {len(images)} image(s) need {per_image} each"
        )
    if len(images) > max_images:
        raise LmbundleError(f"prompt has {len(images)} images; this decoder takes at most {max_images}")
    if not images:
        return ids, None
    starts = placeholders[::per_image]
    for k, start in enumerate(starts.tolist()):
        if not torch.equal(placeholders[k * per_image : (k + 1) * per_image], torch.arange(start, start + per_image)):
            raise LmbundleError(f"image {k + 1}'s {per_image} placeholder tokens are not contiguous in the prompt")
    ids[placeholders] = vocab_size + torch.arange(placeholders.numel())

    embeds, deepstack = images[0]
    context = ImageContext.empty(embeds.shape[-1], max_images, grid, deepstack.shape[0] // per_image, embeds.dtype)
    num_deepstack = context.num_deepstack
    slots = context.slots
    for k, (embeds, deepstack) in enumerate(images):
        first = k * per_image
        context.image_embeds[first : first + per_image] = embeds
        for layer in range(num_deepstack):
            row = layer * slots + first
            context.deepstack_embeds[row : row + per_image] = deepstack[layer * per_image : (layer + 1) * per_image]
        context.rope_shift_start[k] = int(starts[k]) + per_image
        context.rope_shift_amount[k] = per_image - max(grid)
    return ids, context


class ImagePromptGraph:
    """Image prompts for a step graph (mixed in before the decoder class, whose `embed` and
    `rope_positions` it replaces): the id-space embedding, in-graph M-RoPE and DeepStack adds of the
    module docstring. With no `ImageContext` set the graph is the plain text model."""

    images: ImageContext | None = None

    def set_images(self, images: ImageContext | None) -> None:
        """The host's per-prompt static inputs (None: text only)."""
        self.images = images

    def _slots(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_image [S], slot [S]) of tokens; slot is 0 for text tokens."""
        is_image = ids >= self.cfg.vocab_size
        return is_image, torch.where(is_image, ids - self.cfg.vocab_size, torch.zeros_like(ids))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.model.embed_tokens.weight
        if self.images is None:
            return table[ids]
        is_image, slot = self._slots(ids)
        text = table[torch.where(is_image, torch.zeros_like(ids), ids)]
        image = self.images.image_embeds[slot].to(table.dtype)
        return torch.where(is_image.unsqueeze(-1), image, text)

    def rope_positions(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(t, h, w) [3, S] from ids and sequence positions (module docstring)."""
        if self.images is None:
            return positions.unsqueeze(0).expand(3, -1)
        images = self.images
        is_image, slot = self._slots(ids)
        _, within = _divmod(slot, images.tokens_per_image)
        ended = positions.unsqueeze(-1) >= images.rope_shift_start.to(positions.dtype)  # [S, M]
        amount = images.rope_shift_amount.to(positions.dtype).expand_as(ended)
        shift = torch.where(ended, amount, torch.zeros_like(amount)).sum(-1)
        base = positions - shift - within
        rows, cols = _divmod(within, images.grid[1])  # both 0 for text tokens
        return torch.stack((base, base + rows, base + cols))

    def deepstack(self, layer_index: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """After layer l < n_deepstack, image tokens add their row of DeepStack level l."""
        if self.images is None or layer_index >= self.images.num_deepstack:
            return x
        is_image, slot = self._slots(ids)
        rows = self.images.deepstack_embeds[layer_index * self.images.slots + slot].to(x.dtype)
        return x + torch.where(is_image.unsqueeze(-1), rows, torch.zeros_like(rows))


def _divmod(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor quotient and remainder of non-negative ints, as ops Core AI lowers (it has no aten.remainder)."""
    quotient = torch.div(a, b, rounding_mode="floor")
    return quotient, a - quotient * b
