"""The Qwen3-VL / Qwen3.5 vision encoder for one image on a fixed patch grid.

One definition serves both families; the config decides the sizes and whether DeepStack mergers
exist (Qwen3-VL taps blocks 5/11/17 of the 2B; Qwen3.5 has none). What depends only on the grid
(which learned position rows to blend and how, the 2D rotary angles) is computed once at
construction as constant tables, so the traced graph has static shapes and only ops that Core AI
lowers (checked: it converts and runs on the Linux runtime within 3e-6 of torch).

Parameter names are the checkpoint's with the `model.visual.` / `visual.` prefix removed; the
only reshaping is the Conv3d patch embedding, which `sanitize` flattens into the linear it is
(kernel = stride = the whole patch). Linears are `lmbundle.models.linear.Linear` so the exporter
can quantize them like the decoder's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmbundle.errors import LmbundleError

from .layers import apply_rope, rope_inv_freq
from .linear import Linear

VISION_PREFIXES = ("model.visual.", "visual.")  # the vision tower's tensors in a checkpoint
_OWN_ROOTS = ("patch_embed.", "pos_embed.", "blocks.", "merger.", "deepstack_merger_list.")
_LAYER_NORM_EPS = 1e-6

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, vision_config: Mapping) -> "VisionConfig":
        """From the `vision_config` dict of a Qwen3-VL or Qwen3.5 config.json."""
        rope = vision_config.get("rope_parameters") or {}
        try:
            config = cls(
                depth=vision_config["depth"],
                hidden_size=vision_config["hidden_size"],
                intermediate_size=vision_config["intermediate_size"],
                num_heads=vision_config["num_heads"],
                out_hidden_size=vision_config["out_hidden_size"],
                patch_size=vision_config.get("patch_size", 16),
                temporal_patch_size=vision_config.get("temporal_patch_size", 2),
                spatial_merge_size=vision_config.get("spatial_merge_size", 2),
                in_channels=vision_config.get("in_channels", 3),
                num_position_embeddings=vision_config.get("num_position_embeddings", 2304),
                deepstack_visual_indexes=tuple(vision_config.get("deepstack_visual_indexes") or ()),
                hidden_act=vision_config.get("hidden_act", "gelu_pytorch_tanh"),
                rope_theta=float(rope.get("rope_theta", 10000.0)),
            )
        except KeyError as exc:
            raise LmbundleError(f"vision_config has no {exc.args[0]!r}") from None
        if config.hidden_act not in _ACTIVATIONS:
            raise LmbundleError(f"vision hidden_act {config.hidden_act!r} is not supported")
        side = int(round(config.num_position_embeddings**0.5))
        if side * side != config.num_position_embeddings:
            raise LmbundleError(f"num_position_embeddings {config.num_position_embeddings} is not a square")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2


class BiasedLinear(Linear):
    """`Linear` plus a dense bias (the vision tower's linears all carry one)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return super().forward(x) + self.bias
        return F.linear(x, self.weight, self.bias)


class PatchEmbed(nn.Module):
    """The Conv3d over one whole (T, p, p) clip per patch, i.e. a linear over the flattened patch."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = BiasedLinear(config.patch_dim, config.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over all patches of one image, 2D rotary on q and k."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = BiasedLinear(config.hidden_size, 3 * config.hidden_size)
        self.proj = BiasedLinear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, H, D]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, D]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = BiasedLinear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = BiasedLinear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=_LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=_LAYER_NORM_EPS)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Folds each merge window of patches into one token of the text model's width.

    The final merger normalises each patch before folding; DeepStack mergers normalise the
    folded vector (`norm_after_fold`).
    """

    def __init__(self, config: VisionConfig, norm_after_fold: bool):
        super().__init__()
        self.merged_dim, self.norm_after_fold = config.merged_dim, norm_after_fold
        self.norm = nn.LayerNorm(config.merged_dim if norm_after_fold else config.hidden_size, eps=_LAYER_NORM_EPS)
        self.linear_fc1 = BiasedLinear(config.merged_dim, config.merged_dim)
        self.linear_fc2 = BiasedLinear(config.merged_dim, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_fold:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionEncoder(nn.Module):
    """patches [grid^2, patch_dim] -> (image_embeds [T, out], deepstack_embeds [n_deepstack * T, out]),
    T = grid^2 / merge^2 tokens (196 for a 28x28 grid)."""

    def __init__(self, config: VisionConfig, grid_side: int = 28):
        super().__init__()
        if grid_side % config.spatial_merge_size:
            raise LmbundleError(f"grid side {grid_side} is not a multiple of the merge size {config.spatial_merge_size}")
        self.config, self.grid_side = config, grid_side
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, norm_after_fold=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, norm_after_fold=True) for _ in config.deepstack_visual_indexes
        )
        self._tables = grid_tables(config, grid_side)

    @property
    def num_tokens(self) -> int:
        return self.grid_side**2 // self.config.spatial_merge_size**2

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables
        x = self.patch_embed(patches.to(self._dtype))
        taps = self.pos_embed.weight[tables.pos_index.to(x.device)]  # [N, 4, hidden]
        x = x + (taps * tables.pos_weight.to(x.device).unsqueeze(-1)).sum(1).to(x.dtype)
        cos, sin = tables.cos.to(x.device), tables.sin.to(x.device)
        deepstack_at = self.config.deepstack_visual_indexes
        deepstack = []  # in block order, which is the order the decoder layers add them in
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if index in deepstack_at:
                deepstack.append(self.deepstack_merger_list[deepstack_at.index(index)](x))
        image_embeds = self.merger(x)
        if deepstack:
            deepstack_embeds = torch.cat(deepstack, dim=0)
        else:
            deepstack_embeds = image_embeds.new_zeros(0, self.config.out_hidden_size)
        return image_embeds, deepstack_embeds

    @property
    def _dtype(self) -> torch.dtype:
        return self.pos_embed.weight.dtype


@dataclass(frozen=True)
class GridTables:
    """Constants of a fixed grid, fp32 whatever the weights' dtype, kept out of the graph's arithmetic
    (and out of the state dict: they are not checkpoint tensors)."""

    pos_index: torch.Tensor  # [N, 4] rows of the learned table around each patch
    pos_weight: torch.Tensor  # [N, 4] their bilinear weights
    cos: torch.Tensor  # [N, head_dim] 2D rotary
    sin: torch.Tensor


def grid_tables(config: VisionConfig, grid_side: int) -> GridTables:
    rows, cols = patch_coordinates(grid_side, config.spatial_merge_size)
    # the learned square table resampled bilinearly, corners aligned, to the grid
    side = int(round(config.num_position_embeddings**0.5))
    row_taps, row_weights = _bilinear_taps(rows, grid_side, side)
    col_taps, col_weights = _bilinear_taps(cols, grid_side, side)
    pos_index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    pos_weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    # 2D rotary: half the frequencies follow the row, half the column
    inv_freq = rope_inv_freq(config.head_dim // 2, config.rope_theta)
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return GridTables(pos_index, pos_weight, angles.cos(), angles.sin())


def patch_coordinates(grid_side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch in merge-window order (the order of the preprocessor's rows)."""
    index = torch.arange(grid_side * grid_side)
    in_col = index % merge
    in_row = (index // merge) % merge
    window = index // (merge * merge)
    windows_per_row = grid_side // merge
    rows = (window // windows_per_row) * merge + in_row
    cols = (window % windows_per_row) * merge + in_col
    return rows, cols


def _bilinear_taps(position: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two table rows around each of `size` corner-aligned sample points on a `side`-long axis, and their weights."""
    source = position.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(source)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (source[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on [N, H, D] in fp32 whatever the weights' dtype (as the checkpoint's encoder does)."""
    return apply_rope(x.float().transpose(0, 1), cos, sin).transpose(0, 1).to(x.dtype)


def sanitize(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The vision tensors of (name, tensor) pairs, named as `VisionEncoder` names them (safe to run twice).

    Keeps `model.visual.*` / `visual.*` (prefix removed) and already-stripped names, drops the rest;
    flattens the Conv3d patch kernel [hidden, C, T, p, p] into the linear's [hidden, C*T*p*p].
    """
    for name, tensor in tensors:
        own = _own_name(name)
        if own is None:
            continue
        if own == "patch_embed.proj.weight" and tensor.dim() > 2:
            tensor = tensor.reshape(tensor.shape[0], -1)
        yield own, tensor


def _own_name(name: str) -> str | None:
    for prefix in VISION_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name if name.startswith(_OWN_ROOTS) else None
