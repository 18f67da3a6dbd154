"""The decode state and its spec: what a step reads and writes besides the weights.

An architecture describes its state once (`StateSpec`, from its config): GDN layers hold a conv state
and a recurrent state of fixed size, attention layers a KV cache whose sequence axis grows with the
context. Everything that sizes or walks the state derives from the spec: `new_state`, the bytes a step
reads, the exported Core AI states, and seeding the state from the oracle's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


@dataclass
class State:
    """conv [n_linear, 1, conv_dim, K-1], rec [n_linear, 1, Hv, Dk, Dv] (fp32): fixed size;
    key/value [n_full, 1, kv_heads, capacity, head_dim]: grow with the context."""

    conv: torch.Tensor
    rec: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

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

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"conv": self.conv, "rec": self.rec, "key": self.key, "value": self.value}


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

    def shapes(self, capacity: int) -> dict[str, tuple[int, ...]]:
        n_lin, n_full = len(self.linear_layers), len(self.full_layers)
        conv = (n_lin, 1, *self.conv) if n_lin else (0,)
        rec = (n_lin, 1, *self.rec) if n_lin else (0,)
        kv = (n_full, 1, self.kv[0], capacity, self.kv[1])
        return {"conv": conv, "rec": rec, "key": kv, "value": kv}

    def new(self, capacity: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        """A zeroed state: the recurrent state in fp32, the rest in the activation dtype."""
        shapes = self.shapes(capacity)
        return State(**{name: torch.zeros(shape, dtype=torch.float32 if name == "rec" else dtype, device=device)
                        for name, shape in shapes.items()})

    def per_layer(self, state: State) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's part of the state: (conv, rec) of a GDN layer, (key, value) [KVH, L, D]
        of an attention layer."""
        views, n_lin, n_full = [], 0, 0
        for kind in self.layer_types:
            if kind == LINEAR_ATTENTION:
                views.append((state.conv[n_lin, 0], state.rec[n_lin, 0]))
                n_lin += 1
            else:
                views.append((state.key[n_full, 0], state.value[n_full, 0]))
                n_full += 1
        return views

    def bytes_per_token(self, dtype_bytes: int) -> dict[str, int]:
        """GDN state bytes a step reads and writes, and the KV bytes each cached position adds to every later step."""
        n_lin, n_full = len(self.linear_layers), len(self.full_layers)
        conv = n_lin * self.conv[0] * self.conv[1] * dtype_bytes
        rec = n_lin * self.rec[0] * self.rec[1] * self.rec[2] * 4
        return {"gdn_state": 2 * (conv + rec), "kv_per_position": n_full * 2 * self.kv[0] * self.kv[1] * dtype_bytes}
