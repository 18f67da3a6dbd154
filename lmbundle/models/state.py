"""The decode state and its spec: what a step reads and writes besides the weights.

An architecture describes its state once (`StateSpec`, from its config): GDN layers hold a conv state
and a recurrent state of fixed size, attention layers a KV cache whose sequence axis grows with the
context. Everything that sizes or walks the state derives from the spec: `new_state`, the bytes a step
reads, the exported Core AI states, and seeding the state from the oracle's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
GROWING_STATES = ("key", "value")  # the `State` fields whose sequence axis grows with the context


@dataclass
class State:
    """conv [n_linear, 1, conv_dim, K-1], rec [n_linear, 1, Hv, Dk, Dv] (fp32): fixed size;
    key/value [n_full, 1, kv_heads, capacity, head_dim]: grow with the context.

    The second axis is the sequence slot: a pool for batched decoding holds P slots, and a step on `rows`
    B of them (`rows_of`) gives each layer its state with that axis kept (one row per sequence)."""

    conv: torch.Tensor
    rec: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    rows: ClassVar[bool] = False  # a view of several slots for the batched step (`Rows`); else slot 0

    @property
    def capacity(self) -> int:
        return self.key.shape[3]

    def zero_(self) -> "State":
        for t in self.tensors().values():
            t.zero_()
        return self

    def grown(self, capacity: int) -> "State":
        """A copy with a larger KV capacity (the written prefix is copied on the device)."""
        if capacity <= self.capacity:
            return self
        shape = (*self.key.shape[:3], capacity, self.key.shape[4])
        key, value = self.key.new_zeros(shape), self.value.new_zeros(shape)
        key[:, :, :, : self.capacity].copy_(self.key)
        value[:, :, :, : self.capacity].copy_(self.value)
        return State(self.conv, self.rec, key, value)

    def clone(self) -> "State":
        return State(*(t.clone() for t in self.tensors().values()))

    @property
    def slots(self) -> int:
        return self.key.shape[1]

    def slot(self, index: int) -> "State":
        """One slot of a pool as a one-sequence state (views: steps on it write the pool)."""
        return State(*(t[:, index : index + 1] for t in self.tensors().values()))

    def prefix(self, length: int) -> dict[str, torch.Tensor]:
        """Copies of what the state holds after `length` positions: conv and recurrent state and the first
        `length` KV rows (a prefix cache entry)."""
        return {"conv": self.conv.clone(), "rec": self.rec.clone(),
                "key": self.key[..., :length, :].clone(), "value": self.value[..., :length, :].clone()}

    def load_prefix(self, saved: dict[str, torch.Tensor], length: int) -> None:
        """Put a `prefix(length)` back (positions past it stay masked until written)."""
        self.copy_from(State(**saved), length)

    def copy_from(self, other: "State", length: int) -> None:
        """What `other` holds after `length` positions (its KV at least `length` long), copied in place."""
        sources = other.tensors()
        for name, t in self.tensors().items():
            source = sources[name]
            if name in GROWING_STATES:
                t[..., :length, :].copy_(source[..., :length, :])
            else:
                t.copy_(source)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Slot src's state (its first `length` KV rows) into slot dst of a pool."""
        self.slot(dst).copy_from(self.slot(src), length)

    def rows_of(self, count: int) -> "State":
        """Slots 0..count-1 as the rows of a batched step (views)."""
        return Rows(*(t[:, :count] for t in self.tensors().values()))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"conv": self.conv, "rec": self.rec, "key": self.key, "value": self.value}


class Rows(State):
    """Slots 0..B-1 of a pool as the rows of a batched step: each layer's state keeps the slot axis."""

    rows: ClassVar[bool] = True


@dataclass(frozen=True)
class StateSpec:
    layer_types: tuple[str, ...]
    conv: tuple[int, int]  # per GDN layer: (conv_dim, K - 1)
    rec: tuple[int, int, int]  # per GDN layer: (Hv, Dk, Dv), fp32
    kv: tuple[int, int]  # per attention layer: (kv_heads, head_dim); the sequence axis grows

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    def shapes(self, capacity: int, slots: int = 1) -> dict[str, tuple[int, ...]]:
        n_lin, n_full = len(self.linear_layers), len(self.full_layers)
        conv = (n_lin, slots, *self.conv) if n_lin else (0,)
        rec = (n_lin, slots, *self.rec) if n_lin else (0,)
        kv = (n_full, slots, self.kv[0], capacity, self.kv[1])
        return {"conv": conv, "rec": rec, "key": kv, "value": kv}

    def new(self, capacity: int, device=None, dtype: torch.dtype = torch.float32, slots: int = 1) -> State:
        """A zeroed state (`slots` sequences: a pool for batched decoding): the recurrent state in fp32,
        the rest in the activation dtype."""
        shapes = self.shapes(capacity, slots)
        return State(**{name: torch.zeros(shape, dtype=torch.float32 if name == "rec" else dtype, device=device)
                        for name, shape in shapes.items()})

    def per_layer(self, state: State) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's part of the state: (conv, rec) of a GDN layer, (key, value) [KVH, L, D]
        of an attention layer; with a leading row axis [B, ...] for a batched step's rows."""
        views, n_lin, n_full = [], 0, 0
        slot = slice(None) if state.rows else 0
        for kind in self.layer_types:
            if kind == LINEAR_ATTENTION:
                views.append((state.conv[n_lin, slot], state.rec[n_lin, slot]))
                n_lin += 1
            else:
                views.append((state.key[n_full, slot], state.value[n_full, slot]))
                n_full += 1
        return views

    def bytes_per_token(self, dtype_bytes: int) -> dict[str, int]:
        """GDN state bytes a step reads and writes, and the KV bytes each cached position adds to every later step."""
        n_lin, n_full = len(self.linear_layers), len(self.full_layers)
        conv = n_lin * self.conv[0] * self.conv[1] * dtype_bytes
        rec = n_lin * self.rec[0] * self.rec[1] * self.rec[2] * 4
        return {"gdn_state": 2 * (conv + rec), "kv_per_position": n_full * 2 * self.kv[0] * self.kv[1] * dtype_bytes}
