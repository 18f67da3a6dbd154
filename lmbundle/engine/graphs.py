"""CUDA graphs for the PyTorch backend: capturing a function of the state, and prompt chunks as replays.

Eagerly, a prompt chunk of the 2B is some 1,500 kernel launches: 0.13-0.18 s on an H200 whatever its
length, so the host, not the GPU, set the prompt speed (a 128-token prompt took as long as a 2,048-token
one). `PrefillGraphs` replays captured chunks instead: a piece of a prompt is cut into power-of-two sizes
(256 + 32 + 8 + 4 for 300 tokens), each size captured once per attention window on first use, with the
token ids and positions in static buffers. The cut depends only on the piece, never on what ran before,
so a prompt is computed the same way every time (the batch scheduler's exactness rests on that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.state import State

MAX_PIECE = 4096  # the largest captured chunk; longer pieces are cut (the static ids/positions buffers' length)
MIN_CAPACITY = 256


def bucket(length: int, capacity: int) -> int:
    """The attention window for a step that sees `length` positions: a power of two, at most capacity."""
    size = MIN_CAPACITY
    while size < length:
        size *= 2
    return min(size, capacity)


def capture(run: Callable[[], torch.Tensor | None], state: State, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """`run()` (which reads and writes `state`) as a CUDA graph, and the output it returns on every replay.

    It runs once on a side stream first (Triton compiles, cuBLAS and the allocator warm up outside the
    capture); what that run wrote to the state is undone, so capturing changes nothing."""
    saved = {name: t.clone() for name, t in state.tensors().items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    for name, t in state.tensors().items():
        t.copy_(saved[name])
    return graph, out


def piece_sizes(length: int) -> list[int]:
    """The captured sizes a piece of `length` tokens is cut into: powers of two, largest first."""
    sizes = []
    while length:
        size = min(1 << (length.bit_length() - 1), MAX_PIECE)
        sizes.append(size)
        length -= size
    return sizes


class PrefillGraphs:
    """Prompt pieces on one `State` (the backend's, or the batch scheduler's staging slot) as graph replays.

    The graphs share one memory pool (they never run at once), and hold the state's addresses: make a
    new one when the state is replaced."""

    def __init__(self, model: torch.nn.Module, state: State):
        self.model, self.state = model, state
        device = state.key.device
        self._ids = torch.zeros(MAX_PIECE, dtype=torch.long, device=device)
        self._positions = torch.zeros(MAX_PIECE, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, tokens: torch.Tensor, start: int, with_head: bool = True) -> torch.Tensor | None:
        """Feed tokens [S] (on the device) at positions start..start+S-1; the last token's logits [1, V]
        (fp32, a copy) when `with_head`, else None."""
        logits, offset = None, 0
        sizes = piece_sizes(tokens.shape[0])
        for i, size in enumerate(sizes):
            head = with_head and i == len(sizes) - 1
            window = bucket(start + offset + size, self.state.capacity)
            key = (size, window, head)
            graph, out = self._graphs.get(key) or self._capture(*key)
            self._ids[:size].copy_(tokens[offset : offset + size])
            torch.arange(start + offset, start + offset + size, out=self._positions[:size])
            graph.replay()
            offset += size
            if head:
                logits = out.clone()  # the pool is shared: the next replay may reuse this memory
        return logits

    def _capture(self, size: int, window: int, head: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
        model, ids, positions = self.model, self._ids[:size], self._positions[:size]

        def chunk() -> torch.Tensor | None:
            x = model.hidden_states(ids, positions, self.state, window)
            return model.head(x[-1:]) if head else None

        # positions of an earlier piece are valid rope/KV slots inside the window for the warm-up run
        positions.copy_(torch.arange(size, device=positions.device))
        self._graphs[(size, window, head)] = captured = capture(chunk, self.state, self._pool)
        return captured
