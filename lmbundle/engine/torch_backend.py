"""The PyTorch backend: the shared graph on CPU, CUDA (steps and prompt chunks as CUDA graphs) or MPS.

The next token never leaves the device between steps: `step` takes the previous step's token tensor,
so the host can enqueue step n+1 before it reads token n. The KV part of the state is pre-grown to
the request's length in chunks (powers of two), never per token. On CUDA a one-token step runs the
fused Triton kernels of `kernels/triton_ops.py` (five or six launches a layer, chained with programmatic
dependent launch on Hopper) and is captured in a CUDA graph per KV capacity (with and without the
head), so the steady state is one graph replay per token and the only host sync is reading token n
after step n+1 is enqueued. Prompt chunks replay captured graphs too (`graphs.PrefillGraphs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import LmbundleError
from ..models.linear import DenseCopies, Linear
from ..models.state import State
from .graphs import PrefillGraphs, bucket, capture
from .kernels import triton_installed
from .sampling import Sampling, sample


def pick_device(requested: str | None = None) -> torch.device:
    """The device asked for (checked to be here), else the best present."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise LmbundleError(f"unknown device {requested!r} (cpu, cuda, cuda:N or mps)") from None
        present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if device.type not in present:
            raise LmbundleError(f"device {requested!r}: lmbundle runs on cpu, cuda or mps")
        if not present[device.type]:
            raise LmbundleError(f"device {requested!r}: no {device.type.upper()} device here (choose cpu)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise LmbundleError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class CudaOptions:
    """How the PyTorch backend runs on CUDA; the defaults are the fastest measured (benchmarks/RESULTS.md).

    `prompt_copies`: keep the int8 body expanded to 16 bits for prompt chunks' matmuls where the copies take
    at most a quarter of the free GPU memory (+2.7 GB for the 2B; `prompt_copies`); off, every chunk expands
    the weights again and the memory stays free. `row_kernels`: the batched step's Triton kernels between its
    GEMMs; off, the reference ops alone (what the CPU runs), for comparing the two. `int8_rows`: the batched
    step's int8 linears read as int8 by one Triton kernel each (`kernels/triton_rows_linear.py`, the residual
    add and SwiGLU fused in) instead of cuBLAS on 16-bit copies; `row_pdl`: its Triton kernels chained by
    programmatic dependent launch (Hopper). Both off until `benchmarks/bench_batch_step.py` has timed them.
    `solo_step`: one request decoding alone runs the fused one-request step (faster for one user); off, the
    batched step at any load (then a request's tokens are bit for bit the same whatever runs beside it:
    scheduler.py)."""

    prompt_copies: bool = True
    row_kernels: bool = True
    int8_rows: bool = False
    row_pdl: bool = False
    solo_step: bool = True


def _install_cuda_kernels(model: torch.nn.Module, device: torch.device, options: CudaOptions) -> DenseCopies | None:
    """The fused projections layout, and the Triton ops: fused kernels for one-token steps (chained with
    programmatic dependent launch from Hopper on), the int8 GEMV for other short int8 matmuls, dense copies
    of the int8 body for prompt chunks where they fit (returned: the batch scheduler reads the same ones)."""
    model.fuse_projections_()
    if not triton_installed():
        return None
    from .kernels.triton_ops import TritonStepOps

    pdl = torch.cuda.get_device_capability(device) >= (9, 0)
    kept = prompt_copies(model, torch.cuda.mem_get_info(device)[0]) if options.prompt_copies else None
    model.ops = TritonStepOps(pdl, kept=kept)
    return kept


def _int8_linears(model: torch.nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.quantized]


def _expanded_bytes(linears: list[Linear], dtype: torch.dtype) -> int:
    """What the int8 `linears` take expanded to `dtype`."""
    return sum(m.qweight.numel() for m in linears) * torch.finfo(dtype).bits // 8


def prompt_copies(model: torch.nn.Module, free: int) -> DenseCopies | None:
    """The body's int8 weights kept expanded for prompt chunks' matmuls, when the copies take at most a
    quarter of the `free` device memory (the 2B: +2.7 GB): a 128-token chunk of the 2B int8hu spent 1.19
    of its 4.67 ms expanding them on every call (H200). Decode still reads the int8 weights. The head is
    left out: a prompt runs it on its last token only, through the GEMV."""
    linears = [m for m in _int8_linears(model) if m is not model.lm_head]
    dtype = model.model.embed_tokens.weight.dtype
    return DenseCopies(linears, dtype) if linears and _expanded_bytes(linears, dtype) <= free // 4 else None


def _available_memory() -> int | None:
    """Memory a process can still take: Linux's MemAvailable (free + reclaimable page cache), else the
    free pages where the OS reports them."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every OS
        return None


def dequantize_for_cpu(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """On the CPU, expand int8 weights to `dtype` once, when that fits in half the free memory.

    There is no block-32 int8 GEMV on the CPU: the reference dequantizes every weight on every call,
    writing and re-reading a full-width copy. Dequantizing once computes the same values 6-9x faster (the
    Qwen3.5-0.8B config on 2 cores: 4.7 tok/s against 0.5-0.8) at 4x the weight memory."""
    linears = _int8_linears(model)
    free = _available_memory()
    if linears and free is not None and _expanded_bytes(linears, dtype) <= free // 2:
        for linear in linears:
            linear.dequantize_(dtype)


@dataclass
class TorchStep:
    """An enqueued step: its logits [1, 1, V] fp32, on the device."""

    logits: torch.Tensor


@dataclass
class PendingToken:
    """A sampled token on the GPU, already being copied to pinned host memory when it was made.

    Reading it waits for that copy only. A plain `.item()` would queue its copy behind step n+1 (enqueued
    before token n is read) and so wait for that whole step, leaving the GPU idle while the host then
    enqueues step n+2."""

    device: torch.Tensor  # [1, 1] int64
    host: torch.Tensor  # [1, 1] int64, pinned
    copied: torch.cuda.Event


class TorchBackend:
    """The engine's `ResumableBackend` (backend.py) on the bundle's PyTorch graph."""

    name = "torch"
    resumable = True  # a new prompt that extends what the state holds can skip its known prefix

    def __init__(self, model: torch.nn.Module, device: torch.device, max_context: int,
                 cuda: CudaOptions = CudaOptions()):
        self.model, self.device, self.max_context = model, device, max_context
        self.state: State | None = None
        self.use_graphs = device.type == "cuda"
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._prefill_graphs: PrefillGraphs | None = None
        self.writes = 0  # counts what changes the state, so a caller can tell it is as it left it
        self._token_in = torch.zeros(1, 1, dtype=torch.long, device=device)
        self._position_in = torch.zeros(1, dtype=torch.long, device=device)
        self.prompt_copies: DenseCopies | None = None  # the int8 body expanded for prompt chunks (CUDA)
        if device.type == "cuda":
            self.prompt_copies = _install_cuda_kernels(model, device, cuda)
        elif device.type == "cpu":
            dequantize_for_cpu(model, model.model.embed_tokens.weight.dtype)

    @property
    def prompt_copies_bytes(self) -> int:
        """Device memory taken by int8 weights kept expanded for prompt chunks (`prompt_copies`)."""
        return self.prompt_copies.nbytes if self.prompt_copies is not None else 0

    # -- state ----------------------------------------------------------------------------------
    def reset(self, length: int = 0) -> None:
        """Zero the state and make room for `length` positions (grown in chunks, kept across calls)."""
        self.make_room(length)
        self.state.zero_()
        self.writes += 1

    def make_room(self, length: int) -> None:
        """Make room for `length` positions, keeping what the state holds."""
        capacity = min(bucket(length, 1 << 30), self.max_context)
        if self.state is None:
            self.state = self.model.new_state(capacity, device=self.device)
        elif capacity > self.state.capacity:
            self.state = self.state.grown(capacity)
            self._graphs.clear()  # graphs hold the old tensors' addresses
            self._prefill_graphs = None

    def snapshot_prefix(self, length: int) -> dict[str, torch.Tensor]:
        """What the state holds after `length` positions (a prefix cache entry)."""
        return self.state.prefix(length)

    def restore_prefix(self, saved: dict[str, torch.Tensor], length: int, room: int,
                       logits: torch.Tensor | None = None) -> TorchStep | None:
        """Put a `snapshot_prefix(length)` back, with room for `room` positions; returns the step of its
        last position when given its logits (a prefix cache entry's `logits`)."""
        self.make_room(max(room, length))
        self.state.load_prefix(saved, length)
        self.writes += 1
        return None if logits is None else TorchStep(logits.to(self.device).view(1, 1, -1))

    def load_state(self, write) -> None:
        """Let `write(state)` fill the state in place (the gates seed it from the oracle's cache)."""
        write(self.state)
        self.writes += 1

    # -- steps ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int], chunk: int = 0, start: int = 0, with_head: bool = True) -> TorchStep:
        """Feed prompt tokens at positions start, start+1, ...: S=1 steps (chunk 0), or chunks of `chunk`
        tokens (on CUDA graph replays). Returns the last step (without the head: a piece of a prompt whose
        logits nobody reads)."""
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        last = start + len(ids) - 1
        if chunk <= 0:
            for offset in range(len(ids) - 1):
                self.step(tokens[offset].view(1, 1), start + offset, with_head=False)
            return self.step(tokens[-1].view(1, 1), last, with_head=with_head)
        self.writes += 1
        logits = None
        for offset in range(0, len(ids), chunk):
            piece = tokens[offset : offset + chunk]
            head = with_head and offset + chunk >= len(ids)
            if self.use_graphs:
                if self._prefill_graphs is None:
                    self._prefill_graphs = PrefillGraphs(self.model, self.state)
                logits = self._prefill_graphs.run(piece, start + offset, head)
            else:
                logits = self.model.forward_tokens(piece, start + offset, self.state, last_only=True)
        return TorchStep(logits.view(1, 1, -1) if logits is not None else None)

    @torch.inference_mode()
    def step(self, token: torch.Tensor | PendingToken, position: int, with_head: bool = True) -> TorchStep:
        """Enqueue one decode step for `token` ([1, 1] device tensor) at `position` (without the head:
        a prompt token whose logits nobody reads)."""
        if isinstance(token, PendingToken):
            token = token.device
        self.writes += 1
        if not self.use_graphs:
            window = bucket(position + 1, self.state.capacity)
            pos = torch.tensor([position], device=self.device)
            return TorchStep(self.model.step(token.view(1, 1), pos, self.state, window, with_head))
        # one graph per KV capacity: the step attends over the whole (masked) cache, which costs
        # kv_per_position bytes per slot and saves a capture per window
        key = (self.state.capacity, with_head)
        graph, logits = self._graphs.get(key) or self._capture(*key)
        self._token_in.copy_(token.view(1, 1))
        self._position_in.fill_(position)
        graph.replay()
        return TorchStep(logits)

    def _capture(self, window: int, with_head: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._graphs[(window, with_head)] = captured = capture(
            lambda: self.model.step(self._token_in, self._position_in, self.state, window, with_head), self.state)
        return captured

    def next_token(self, handle: TorchStep, sampling: Sampling, generator) -> torch.Tensor | PendingToken:
        """The chosen token on the device [1, 1] (a copy: graph outputs are reused); on CUDA its copy to
        the host starts right away (a `PendingToken`)."""
        token = sample(handle.logits, sampling, generator).clone()
        if self.device.type != "cuda":
            return token
        host = torch.empty((1, 1), dtype=token.dtype, pin_memory=True)
        host.copy_(token, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return PendingToken(token, host, copied)

    def read_token(self, token: torch.Tensor | PendingToken) -> int:
        if isinstance(token, PendingToken):
            token.copied.synchronize()
            return int(token.host.item())
        return int(token.item())

    def logits(self, handle: TorchStep) -> torch.Tensor:
        return handle.logits.reshape(-1).float().cpu()

    def close(self) -> None:
        """Nothing beyond memory to release."""
