"""CUDA graphs for the PyTorch backend: capturing a function of the state, and prompt chunks as replays.

Eagerly, a prompt chunk of the 2B is some 1,500-5,000 kernel launches: 0.13-0.18 s on an H200 whatever its
length, so the host, not the GPU, set the prompt speed (a 128-token prompt took as long as a 2,048-token
one). `PrefillGraphs` replays captured chunks instead, one graph per chunk length (and attention window,
where the attention's bits depend on it: the reference's softmax; the CUDA chunk kernel stops at each
token's position), captured on first use or up front (`warm`). A replay has a fixed cost (~5 ms for the
2B: thousands of small kernels), so a piece is padded up to the next captured length (a power of two, at
least `MIN_PADDED`) rather than cut into many: the padding tokens sit after the real ones, leave the GDN
states as the real ones left them and write KV only past them (`hidden_states(valid=...)`). A piece that
cannot be padded (its padding would run past the KV capacity) is cut into exact power-of-two lengths.
Either way the cut depends only on the piece and the capacity, so a prompt is computed the same way every
time (the batch scheduler's exactness rests on that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.state import State

MAX_PIECE = 4096  # the largest captured chunk; longer pieces are cut (the static ids/positions buffers' length)
MIN_PADDED = 16  # pieces of 2..16 tokens run as 16 (one token runs alone: the fused one-token step)
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
    capture); what that run wrote to the state is undone, so capturing changes nothing. The capture
    checks only this thread's CUDA calls: under `serve` another request's thread may be running steps."""
    saved = {name: t.clone() for name, t in state.tensors().items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    for name, t in state.tensors().items():
        t.copy_(saved[name])
    return graph, out


def padded_size(length: int) -> int:
    """The captured chunk length a piece of 1..MAX_PIECE tokens is padded to."""
    return 1 if length == 1 else max(MIN_PADDED, 1 << (length - 1).bit_length())


def piece_sizes(length: int) -> list[int]:
    """Exact captured lengths a piece of `length` tokens is cut into: powers of two, largest first."""
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
        self._valid = torch.ones(1, dtype=torch.long, device=device)  # real tokens of the chunk being replayed
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._window_free = model.prompt_window_free(state)  # one window (the capacity) serves every piece

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, tokens: torch.Tensor, start: int, with_head: bool = True) -> torch.Tensor | None:
        """Feed tokens [S] (on the device) at positions start..start+S-1; the last token's logits [1, V]
        (fp32, a copy) when `with_head`, else None."""
        pieces = []  # (offset, real tokens, captured length)
        for at in range(0, tokens.shape[0], MAX_PIECE):
            length = min(MAX_PIECE, tokens.shape[0] - at)
            if start + at + padded_size(length) <= self.state.capacity:
                pieces.append((at, length, padded_size(length)))
            else:
                for size in piece_sizes(length):
                    pieces.append((at, size, size))
                    at += size
        logits = None
        for i, (offset, length, size) in enumerate(pieces):
            head = with_head and i == len(pieces) - 1
            key = (size, self._window(start + offset + size), head)
            graph, out = self._graphs.get(key) or self._capture(*key)
            self._ids[:length].copy_(tokens[offset : offset + length])
            torch.arange(start + offset, start + offset + size, out=self._positions[:size])
            self._valid.fill_(length)
            graph.replay()
            if head:
                logits = out.clone()  # the pool is shared: the next replay may reuse this memory
        return logits

    def warm(self, longest: int) -> int:
        """Capture, ahead of the first prompts, the graphs of every piece up to `longest` tokens (with and
        without the head) where one window serves all positions; returns how many were captured. A server
        pays this once at start, instead of a stall (a capture and its Triton compiles) on each new length."""
        if not self._window_free:
            return 0
        sizes = sorted({padded_size(n) for n in range(1, min(longest, MAX_PIECE) + 1)})
        todo = [(size, self.state.capacity, head) for size in sizes for head in (False, True)
                if size <= self.state.capacity and (size, self.state.capacity, head) not in self._graphs]
        for key in todo:
            self._capture(*key)
        return len(todo)

    def _window(self, end: int) -> int:
        return self.state.capacity if self._window_free else bucket(end, self.state.capacity)

    def _capture(self, size: int, window: int, head: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
        model, ids, positions, valid = self.model, self._ids[:size], self._positions[:size], self._valid

        def chunk() -> torch.Tensor | None:
            x = model.hidden_states(ids, positions, self.state, window, valid=valid if size > 1 else None)
            return model.head(x.index_select(0, valid - 1)) if head else None

        positions.copy_(torch.arange(size, device=positions.device))  # a valid warm-up run
        valid.fill_(size)
        self._graphs[(size, window, head)] = captured = capture(chunk, self.state, self._pool)
        return captured
