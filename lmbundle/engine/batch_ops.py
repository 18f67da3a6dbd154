"""The batch scheduler's device-side helpers: the batched step's ops and a pinned-memory ring for host ints.

`BatchOps` is the reference math with each linear's rows padded to a fixed count: a row's result is then the
same in any batch, whatever the others hold (the exactness the scheduler rests on). `HostInts` moves the
scheduler's small int lists (tokens, positions, gather indices, prompt pieces) to the device without a
blocking copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.linear import DenseCopies, Linear, dequantize
from ..models.ops import StepOps

ROW_TILE = 16  # linears' rows are padded to a multiple of this


class BatchOps(StepOps):
    """The batched step's ops: the reference math with each linear's rows padded to `rows` (so a row's
    result is the same in any batch) and, on an accelerator, the int8 weights read from a dense copy
    made once (one weight read serves every row; the values the reference computes on each call)."""

    def __init__(self, rows: int, dense: bool, kept: DenseCopies | None = None):
        self.rows = rows
        self.dense = dense
        self.kept = kept  # the prompt chunks' copies (`torch_backend.prompt_copies`): not made twice
        self._weights: dict[int, torch.Tensor] = {}

    def weight(self, w: Linear, dtype: torch.dtype) -> torch.Tensor:
        if not w.quantized:
            return w.weight
        if not self.dense:
            return dequantize(w.qweight, w.scales, dtype)
        if (dense := self._weights.get(id(w))) is None:
            kept = self.kept.get(w.qweight, dtype) if self.kept is not None else None
            dense = self._weights[id(w)] = kept if kept is not None else dequantize(w.qweight, w.scales, dtype)
        return dense

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        rows = x.shape[0]
        if rows < self.rows:
            x = F.pad(x, (0, 0, 0, self.rows - rows))
        return F.linear(x, self.weight(w, x.dtype))[:rows]


class HostInts:
    """Host ints as int64 tensors on the device, without waiting: `host_ints(values)`.

    A blocking copy (what `torch.tensor(..., device=cuda)` makes) waits for every step and prompt piece
    queued; a non-blocking one from pageable memory still has the driver stage it on the calling thread,
    holding the GIL (at 32 clients on the H200, a quarter of the batch loop's time). On CUDA
    the values go through a ring of page-locked buffers instead, each reused once its copy has landed;
    elsewhere (CPU, MPS) through the same ring by plain copies."""

    def __init__(self, device: torch.device, size: int, slots: int = 16):
        self.device, self.size = device, size
        self.cuda = device.type == "cuda"
        self._buffers = [torch.empty(size, dtype=torch.long, pin_memory=self.cuda) for _ in range(slots)]
        self._landed: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def __call__(self, values) -> torch.Tensor:
        if len(values) > self.size:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=self.cuda)
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        if self._landed[slot] is not None:
            self._landed[slot].synchronize()
        staged = self._buffers[slot][: len(values)]
        staged.numpy()[:] = values
        out = torch.empty(len(values), dtype=torch.long, device=self.device)
        out.copy_(staged, non_blocking=self.cuda)
        if self.cuda:
            self._landed[slot] = torch.cuda.Event()
            self._landed[slot].record()
        return out
