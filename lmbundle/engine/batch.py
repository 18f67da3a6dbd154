"""Continuous batching: many requests share one decode step, each with its own slot of the state pool.

The pool holds 2 x `max_batch` slots (GDN conv + recurrent state and a KV cache row each, preallocated):
the decoding sequences in slots 0..B-1, the ones still prefilling in the upper half.
A scheduler thread loops: admit waiting requests into free slots (restoring the longest cached prefix
into the slot), prefill prompt pieces under a token budget (a long prompt goes in pieces between decode
steps, so it never stalls the others), then one batched decode step for every sequence that has its
first token: B tokens at B different positions, one read of the weights for all (`step_rows`, the same
graph as the one-token step with a row axis on each layer's state). Sequences join and leave between
steps; the decoding ones keep slots 0..B-1 (a finished one's slot is refilled by the last). Pipelined like
the one-request engine: step k+1 is enqueued with step k's tokens taken on the device, before the host
reads step k's tokens and hands them out, so the GPU computes while the host streams text; a sequence
that stopped at step k has fed one more token in step k+1, a row of waste. On CUDA the
step runs on all `max_batch` rows at every load, as one CUDA graph (cuBLAS GEMMs on dense weights and
the rows kernels of `kernels/triton_rows.py` between them): the padding rows step free decode slots.
Prompt pieces replay the prompt graphs (`graphs.PrefillGraphs`) on a staging slot.

Exact: a request's tokens do not depend on what else runs. Its prompt is cut into pieces at fixed
absolute positions (chunk multiples and the prefix cache's cut points), whatever the load; the batched
step always has the same row count, so every kernel runs the same configuration, and no row's result
reads another row's (the rows kernels attend over each row's own prefix; the reference ops pad each
linear's rows to a fixed count and attend over each slot's whole KV row). Each request samples with its
own generator, so a seeded request repeats whatever runs beside it.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.linear import DenseCopies, Linear, dequantize
from ..models.ops import StepOps
from .graphs import MAX_PIECE, PrefillGraphs, capture
from .kernels import triton_installed
from .outputs import TokenStops
from .prefix_cache import PrefixCache
from .request import Stats
from .sampling import Sampling, sample

ROW_TILE = 16
# a request's tokens go to its thread at most this often (its first at once): with 32 rows stepping every
# ~2.5 ms, each request thread wakes (and takes the GIL from the scheduler) a quarter as often, and 10 ms of
# tokens at a time stream as smoothly to a reader
STREAM_FRAME_S = 0.01
# ...and all requests' frames together about this often at most (longer frames when many decode): each
# frame becomes a streamed chunk, and at 32 clients (~3,000 a second) the HTTP loop's sends held the GIL
# in 36 % of py-spy's samples against the scheduler's 25 % (H200, 2026-12-02): 32 ms frames at 32 rows
STREAM_FRAMES_PER_S = 1000


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


@dataclass
class Sequence:
    ids: list[int]
    stops: TokenStops
    sampling: Sampling
    stats: Stats
    chunk: int
    generator: torch.Generator | None = None
    out: queue.Queue = field(default_factory=queue.Queue)  # lists of tokens, then None (or an error, None)
    unsent: list[int] = field(default_factory=list)  # tokens not yet put on `out`
    sent: float = 0.0  # when `out` was last given tokens
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    pos: int = 0  # positions the slot's state holds
    cuts: set[int] | None = None  # where the prefix cache snapshots the prompt (its end too); None: nowhere
    logits: torch.Tensor | None = None  # the prompt's last logits, when the prefix cache held it whole
    decoding: bool = False
    first_token: int | None = None  # chosen from the prompt's logits (on the host): the first step feeds it
    chosen: list[int] = field(default_factory=list)  # every token read back, a stop token included
    start: float = 0.0
    first: float | None = None


@dataclass
class Step:
    """An enqueued batched step: its rows, the token chosen for each (on the device) and their host copy,
    complete once `done` (a CUDA event; None off CUDA, where the copy waited for the step)."""

    rows: list[Sequence]
    tokens: torch.Tensor
    host: torch.Tensor
    done: "torch.cuda.Event | None"

    def read(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class HostInts:
    """Host ints as int64 tensors on the device, without waiting: `host_ints(values)`.

    A blocking copy (what `torch.tensor(..., device=cuda)` makes) waits for every step and prompt piece
    queued; a non-blocking one from pageable memory still has the driver stage it on the calling thread
    (py-spy on the H200 at 32 clients: 27 % of the scheduler thread's samples holding the GIL). On CUDA
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


class BatchScheduler:
    def __init__(self, backend, cache: PrefixCache, max_batch: int, token_budget: int = 512, chunk: int = 256,
                 row_kernels: bool = True):
        self.model, self.device, self.cache = backend.model, backend.device, cache
        self.max_batch, self.token_budget, self.chunk = max_batch, token_budget, chunk
        self.capacity = backend.max_context
        self.prompt_copies = backend.prompt_copies
        self.row_kernels = row_kernels
        weight = self.model.model.embed_tokens.weight
        self.pool = self.model.state_spec.new(self.capacity, self.device, weight.dtype, slots=2 * max_batch)
        self.owner: list[Sequence | None] = [None] * (2 * max_batch)  # decode slots, then prefill slots
        self.use_graphs = self.device.type == "cuda"
        self.prefill_graphs = None  # with graphs: prompt pieces replayed on a staging slot
        if self.use_graphs:
            staging = self.model.state_spec.new(self.capacity, self.device, weight.dtype)
            self.prefill_graphs = PrefillGraphs(self.model, staging)
        self.padded = self.device.type == "cuda"  # every step on all max_batch rows (the one graph's layout)
        self._graph: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None
        self._ids_in = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._positions_in = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._live_in = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.ops = self._batch_ops()
        self._unread: Step | None = None  # the last step enqueued, its tokens not yet handed out
        self._host_tokens = [torch.zeros(max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
                             for _ in range(2)]  # the steps' tokens land here, alternately
        # a step's tokens, positions and gather indices (4 ints a row at most), or a prompt piece
        self._on_device = HostInts(self.device, max(4 * max_batch, MAX_PIECE))
        self.active: list[Sequence] = []  # admission order
        self.decoding: list[Sequence] = []  # slot order: decoding[i].slot == i
        self.batch_size = 0
        self.peak_batch = 0
        self.steps = 0
        # where the scheduler thread's time goes (/metrics): restoring cached prefixes into slots, prompt
        # pieces, snapshots into the prefix cache, enqueueing batched steps and handing out their tokens,
        # waiting for a step's tokens (the device's time beyond the host's), waiting for work
        self.seconds = Counter(dict.fromkeys(("admit", "prefill", "cache", "decode", "wait", "idle"), 0.0))
        self._inner: list[float] = []  # time of the phases timed inside the open ones
        self._pending: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._closing = False
        # the request threads wake once per token each; at Python's default 5 ms switch interval the
        # scheduler waits that long for the GIL after every step (measured on the H200: 6 ms steps at B=1)
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
        self._thread = threading.Thread(target=self._loop, name="lmbundle-batch", daemon=True)
        self._thread.start()

    def _batch_ops(self) -> StepOps:
        """The reference math with padded rows (int8 weights from a dense copy off the CPU); on CUDA its
        GEMMs with the rows kernels of `kernels/triton_rows.py` around them (LMBUNDLE_ROW_KERNELS=0: the
        reference alone: a 32-row 2B int8hu step 8.9 ms on the H200 against 2.5-2.8 ms)."""
        linears = BatchOps(-(-self.max_batch // ROW_TILE) * ROW_TILE, dense=self.device.type != "cpu",
                           kept=self.prompt_copies)
        if self.device.type == "cuda" and triton_installed() and self.row_kernels:
            from .kernels.triton_rows import RowStepOps

            return RowStepOps(self._live_in, linears)
        return linears

    # -- the requests' side ---------------------------------------------------------------------
    def generate(self, ids: list[int], stops: TokenStops, sampling: Sampling, prefill_chunk: int,
                 stats: Stats) -> Iterator[int]:
        seq = Sequence(list(ids), stops, sampling, stats, prefill_chunk or self.chunk)
        seq.generator = sampling.generator(self.device)
        seq.start = time.perf_counter()
        with self._wake:
            self._pending.append(seq)
            self._wake.notify()
        try:
            while (item := seq.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            seq.cancelled.set()
            with self._wake:
                self._wake.notify()

    def warm(self) -> int:
        """Capture the prompt graphs of every piece length up to the chunk now (CUDA; between requests)."""
        return self.prefill_graphs.warm(self.chunk) if self.prefill_graphs is not None else 0

    def close(self) -> None:
        self._closing = True
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=5)

    # -- the scheduler thread -------------------------------------------------------------------
    @contextmanager
    def _timed(self, phase: str):
        """Time spent in `phase`, less what phases timed inside it took (a snapshot during a prompt piece)."""
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[phase] += elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._closing:
                with self._wake:
                    with self._timed("admit"):
                        self._admit()
                    if not self.active:
                        self.batch_size = 0
                        with self._timed("idle"):
                            self._wake.wait(timeout=1.0)
                        continue
                try:
                    self._iteration()
                except Exception as exc:  # a fault of the step itself: every request in it fails, slots free
                    for seq in list(self.active):
                        self._finish(seq, None, error=exc)

    def _admit(self) -> None:
        while self._pending and len(self.active) < self.max_batch:
            seq = self._pending.popleft()
            if seq.cancelled.is_set():
                continue
            seq.slot = self.owner.index(None, self.max_batch)
            self.owner[seq.slot] = seq
            self.active.append(seq)
            try:
                self._restore(seq)
            except Exception as exc:
                self._finish(seq, None, error=exc)

    def _restore(self, seq: Sequence) -> None:
        """The longest cached prefix into the sequence's slot (else a zeroed slot)."""
        state, cache = self.pool.slot(seq.slot), self.cache
        held, entry = cache.lookup(seq.ids, limit=len(seq.ids))
        if entry is not None:
            state.load_prefix(entry.state, held)
            if held == len(seq.ids):  # the same prompt before: its last token's logits were kept
                seq.logits = entry.logits.to(self.device)
        else:
            for t in state.tensors().values():
                t.zero_()
        seq.pos = held
        seq.stats.cached_tokens = held
        if cache.enabled:
            seq.cuts = set(cache.cuts(seq.ids, held))

    def _iteration(self) -> None:
        for seq in list(self.active):
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
        budget = self.token_budget - len(self.decoding)
        fed = 0
        for seq in [s for s in self.active if not s.decoding]:
            while not seq.decoding and seq.slot >= 0 and (budget > 0 or not fed):
                with self._timed("prefill"):
                    n = self._prefill_piece(seq)
                budget, fed = budget - n, fed + n
        with self._timed("decode"):
            unread, self._unread = self._unread, self._decode() if self.decoding else None
            if unread is not None:
                with self._timed("wait"):
                    tokens = unread.read()
                self._hand_out(unread.rows, tokens)

    def _prefill_piece(self, seq: Sequence) -> int:
        """Prefill from seq.pos to the next cut point (chunk multiple, prefix cache cut, prompt end); a
        prompt the cache held whole (with its logits) has nothing left to prefill."""
        ids, start = seq.ids, seq.pos
        end = min(len(ids), (start // seq.chunk + 1) * seq.chunk, *(c for c in seq.cuts or () if c > start))
        slot, graphs = self.pool.slot(seq.slot), self.prefill_graphs
        try:
            if start == end:
                logits, seq.logits = seq.logits, None
            elif graphs is None:
                logits = self.model.forward_tokens(self._on_device(ids[start:end]), start, slot, last_only=True)
            else:  # through the staging slot the graphs were captured on (a copy of a few MB each way)
                graphs.state.copy_from(slot, start)
                logits = graphs.run(self._on_device(ids[start:end]), start, with_head=end == len(ids))
                slot.copy_from(graphs.state, end)
        except Exception as exc:
            self._finish(seq, None, error=exc)
            return end - start
        seq.pos = end
        if seq.cuts is not None and (end in seq.cuts or end == len(ids) > start):
            self._remember(ids[:end], seq, logits if end == len(ids) else None)
        if end == len(ids):
            self._join_decoding(seq)
            token = self._choose([seq], logits.view(1, -1))
            if seq.slot >= 0:
                seq.first_token = int(token.item())
                self._emit(seq, seq.first_token)
        return end - start

    def _remember(self, ids: list[int], seq: Sequence, logits: torch.Tensor | None = None) -> None:
        """What the sequence's slot holds after `ids` into the prefix cache (with the logits of the last
        token of ids, when given)."""
        with self._timed("cache"):
            self.cache.remember(ids, self.pool.slot(seq.slot).prefix, logits)

    def _join_decoding(self, seq: Sequence) -> None:
        """Move the sequence from its prefill slot into slot len(decoding): the decoding ones stay in 0..B-1."""
        target = len(self.decoding)
        self.pool.copy_slot(seq.slot, target, seq.pos)
        self.owner[seq.slot], self.owner[target] = None, seq
        seq.slot = target
        seq.decoding = True
        self.decoding.append(seq)

    def _decode(self) -> "Step":
        """Enqueue one batched step for every decoding sequence: each feeds the token the unread step
        chose for it (taken on the device) or, just joined, its prompt's token. Nothing here waits."""
        rows = list(self.decoding)
        count = len(rows)
        self.batch_size = count
        self.peak_batch = max(self.peak_batch, count)
        window = self.capacity  # each slot's whole KV row: the same softmax sums whatever the others' lengths
        ids, positions = self._feed(rows)
        if self.padded:
            for t in (self._ids_in, self._positions_in, self._live_in):
                t.zero_()  # padding rows: token 0 at position 0 of a free decode slot, not live
            self._ids_in[:count].copy_(ids)
            self._positions_in[:count].copy_(positions)
            self._live_in[:count].fill_(1)
            if self.use_graphs:
                graph, out = self._graph or self._capture(window)
                graph.replay()
            else:
                out = self.model.step_rows(self._ids_in, self._positions_in, self.pool.rows_of(self.max_batch),
                                           window, self.ops)
            logits = out[:count]
        else:
            logits = self.model.step_rows(ids, positions, self.pool.rows_of(count), window, self.ops)
        self.steps += 1
        for seq in rows:
            seq.pos += 1
        tokens = self._choose(rows, logits)
        host = self._host_tokens[self.steps % 2][:count]
        on_cuda = self.device.type == "cuda"
        host.copy_(tokens, non_blocking=on_cuda)  # elsewhere (CPU, MPS) a copy that has landed when it returns
        done = torch.cuda.Event() if on_cuda else None
        if done is not None:
            done.record()
        return Step(rows, tokens, host, done)

    def _feed(self, rows: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the rows feed and their positions, on the device, in one copy from the host: a row of
        the unread step feeds the token that step chose for it (taken on the device), a row just joined its
        first token."""
        count, unread = len(rows), self._unread
        where = {id(seq): i for i, seq in enumerate(unread.rows)} if unread is not None else {}
        carried = [(i, where[id(s)]) for i, s in enumerate(rows) if id(s) in where]
        staged = self._on_device([0 if s.first_token is None else s.first_token for s in rows]
                                 + [s.pos for s in rows] + [i for pair in zip(*carried) for i in pair])
        ids, positions = staged[:count], staged[count : 2 * count]
        if carried:
            dst, src = staged[2 * count :].view(2, -1)
            ids.index_copy_(0, dst, unread.tokens.index_select(0, src))
        for seq in rows:
            seq.first_token = None
        return ids, positions

    def _capture(self, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The batched step on all max_batch rows, as a CUDA graph (the warm-up run, which also makes the
        dense weights, writes nothing that stays: `graphs.capture`)."""
        rows = self.pool.rows_of(self.max_batch)
        self._graph = capture(lambda: self.model.step_rows(self._ids_in, self._positions_in, rows, window, self.ops),
                              rows)
        return self._graph

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """One token per row, on the device: greedy rows by one argmax, sampled rows each with its own
        generator. A row whose sampling fails ends with that error."""
        chosen = logits.argmax(-1)
        for i, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                try:
                    chosen[i] = sample(logits[i], seq.sampling, seq.generator).view(())
                except Exception as exc:
                    self._finish(seq, None, error=exc)
        return chosen

    def _hand_out(self, rows: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(rows, tokens):
            if seq.slot >= 0:  # not ended since the step was enqueued
                self._emit(seq, token)

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.chosen.append(token)
        now = time.perf_counter()
        stats = seq.stats
        if seq.first is None:
            seq.first = now
            stats.prefill_seconds = now - seq.start
        stats.decode_seconds = now - seq.first
        finish = seq.stops.finish(token, stats.generated_tokens)
        if finish == "stop":
            self._finish(seq, "stop")
            return
        stats.generated_tokens += 1
        seq.unsent.append(token)
        if now - seq.sent >= max(STREAM_FRAME_S, len(self.decoding) / STREAM_FRAMES_PER_S):
            self._send(seq, now)
        if finish == "length":
            self._finish(seq, "length")

    @staticmethod
    def _send(seq: Sequence, now: float) -> None:
        seq.out.put(seq.unsent)
        seq.unsent, seq.sent = [], now

    def _finish(self, seq: Sequence, reason: str | None, error: BaseException | None = None) -> None:
        """End a sequence: its reply's state into the prefix cache, its slot freed (the last decoding
        sequence moves into a decoding hole), its consumer told."""
        if seq.slot < 0:
            return
        if reason is not None:
            seq.stats.stop_reason = reason if reason != "cancelled" else seq.stats.stop_reason
            fed = (seq.ids + seq.chosen)[: seq.pos]  # what the slot holds (the step that fed the last token
            # chosen may still run: what the cache keeps is copied after it)
            if seq.decoding and len(fed) > len(seq.ids):
                self._remember(fed, seq)
        slot = seq.slot
        if seq.decoding:
            last = self.decoding.pop()
            if last is not seq:
                self.pool.copy_slot(last.slot, slot, last.pos)
                self.owner[last.slot] = None
                last.slot = slot
                self.decoding[self.decoding.index(seq)] = last
                self.owner[slot] = last
            else:
                self.owner[slot] = None
        else:
            self.owner[slot] = None
        seq.slot = -1
        self.active.remove(seq)
        if seq.unsent:
            self._send(seq, 0.0)
        seq.out.put(error if error is not None else None)
        if error is not None:
            seq.out.put(None)
