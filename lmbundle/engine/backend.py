"""What runs a bundle's graph for the engine: the PyTorch backend (its graph on CPU, CUDA or MPS) and the
Core AI backend (the shipped `.aimodel` on Apple's runtime) both implement `Backend`.

A step is asynchronous: `step` and `prefill` return a handle at once, `next_token` picks the next token
from a handle without waiting (on the device that holds the logits), and only `read_token` waits, for that
token. So the engine can enqueue step n+1, fed with token n still on the device, before it reads token n.
A `ResumableBackend` also exposes its state: snapshots for the prefix cache, and prompts that resume
from a held prefix (`prefill(start=...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from .sampling import Sampling


@runtime_checkable
class Backend(Protocol):
    name: str
    resumable: bool  # whether it is also a ResumableBackend
    max_context: int

    def reset(self, length: int = 0) -> None:
        """Zero the state, with room for `length` positions."""

    def prefill(self, ids: list[int], chunk: int = 0, start: int = 0, with_head: bool = True) -> Any:
        """Enqueue prompt tokens at positions start, start+1, ...: single-token steps (chunk 0) or chunks
        of about `chunk` tokens; returns the last one's handle (its logits only `with_head`)."""

    def step(self, token: Any, position: int, with_head: bool = True) -> Any:
        """Enqueue one step for `token` (an id, or what `next_token` returned) at `position`."""

    def next_token(self, handle: Any, sampling: Sampling, generator: torch.Generator | None) -> Any:
        """The token chosen from a step's logits, without waiting for it."""

    def read_token(self, token: Any) -> int:
        """A chosen token's id (waits for it)."""

    def logits(self, handle: Any) -> torch.Tensor:
        """A step's logits [V], fp32, on the host."""

    def load_state(self, write: Callable[[Any], None]) -> None:
        """Let `write(state)` fill the state (the gates seed it from the oracle's cache)."""

    def close(self) -> None:
        """Release what the backend holds beyond memory (threads, runtime handles)."""


@runtime_checkable
class ResumableBackend(Backend, Protocol):
    writes: int  # counts what changed the state: a holder can tell it is as it left it

    def make_room(self, length: int) -> None:
        """Room for `length` positions, keeping what the state holds."""

    def snapshot_prefix(self, length: int) -> dict[str, torch.Tensor]:
        """What the state holds after `length` positions (a prefix cache entry)."""

    def restore_prefix(self, saved: dict[str, torch.Tensor], length: int, room: int,
                       logits: torch.Tensor | None = None) -> Any:
        """Put a snapshot back with room for `room` positions; the handle of its last position when given
        its logits, else None."""
