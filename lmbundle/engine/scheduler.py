"""Continuous batching, passive: many requests share one decode step, each with its own slot of the state pool.

The pool holds 2 x `max_batch` slots (GDN conv + recurrent state and a KV cache row each, preallocated): the
decoding sequences in slots 0..B-1, the ones still prefilling in the upper half. Whoever drives the scheduler
(`batching.BatchLoop`, one thread) calls `add`, `prefill`, `decode` and `retire`; nothing here starts a thread or
waits for work. Each turn of the driver's loop, `prefill` admits waiting sequences into free slots (restoring the
longest cached prefix into the slot) and feeds prompt pieces under a token budget (a long prompt goes in pieces
between decode steps, so it never stalls the others), then `decode` enqueues one batched decode step for every
sequence that has its first token: B tokens at B different positions, one read of the weights for all
(`step_rows`, the same graph as the one-token step with a row axis on each layer's state). Sequences join and
leave between steps; the decoding ones keep slots 0..B-1 (a finished one's slot is refilled by the last).
Pipelined like the one-request engine: step k+1 is enqueued with step k's tokens taken on the device, before the
host reads step k's tokens and hands them out, so the GPU computes while the host streams text; a sequence that
stopped at step k has fed one more token in step k+1, a row of waste. Where a sequence ends is decided as its
tokens are read back (`outputs.TokenStops`: its stop tokens and its limit), so its slot is free for the next step.
On CUDA the step runs on all `max_batch` rows at every load, as one CUDA graph (cuBLAS GEMMs on dense weights and
the rows kernels of `kernels/triton_rows.py` between them): the padding rows step free decode slots. Prompt pieces
replay the prompt graphs (`graphs.PrefillGraphs`) on a staging slot.

One sequence decoding alone runs the engine's one-request step instead (`solo`, on slot 0: on CUDA the
fused Triton kernels of `kernels/triton_ops.py` in a CUDA graph, elsewhere the model's own ops), which for one
user is the faster step (1.2 against 2.0 ms for the 2B on the H200); from the second sequence on, the
batched step. A sequence may cross from one to the other between two of its tokens.

Exact: a request's tokens do not depend on what else runs, within what the two steps' arithmetic allows. Its
prompt is cut into pieces at fixed absolute positions (chunk multiples and the prefix cache's cut points),
whatever the load; the batched step always has the same row count, so every kernel runs the same
configuration, and no row's result reads another row's (the rows kernels attend over each row's own prefix;
the reference ops pad each linear's rows to a fixed count and attend over each slot's whole KV row). On the
CPU the one-request step is the same fp32 reference math as the batched step's, so the two agree to fp32
rounding (greedy tokens equal unless two logits tie that closely). On CUDA they are different kernels in
bf16 (a GEMV on int8 weights against cuBLAS on dense copies), so a greedy request that crosses between them
may part from its solo answer where its top two logits are within bf16 rounding; `CudaOptions(solo_step=
False)` keeps every step batched, and then a request's tokens are the same at any load, bit for bit. Each
request samples with its own generator, so a seeded request repeats whatever runs beside it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..models.ops import StepOps
from .batch_ops import ROW_TILE, BatchOps, HostInts
from .graphs import MAX_PIECE, PrefillGraphs, bucket, capture
from .kernels import triton_installed
from .outputs import TokenStops
from .prefix_cache import PrefixCache
from .request import Stats
from .sampling import Sampling, sample
from .torch_backend import CudaOptions, TorchBackend


@dataclass(eq=False)
class Sequence:
    """One request in the scheduler: its prompt, where it ends, how it samples, its figures."""

    ids: list[int]
    stops: TokenStops
    sampling: Sampling
    stats: Stats
    chunk: int = 0  # its prompt pieces end at multiples of this (0: the scheduler's)
    generator: torch.Generator | None = None
    slot: int = -1
    pos: int = 0  # positions the slot's state holds
    cuts: set[int] | None = None  # where the prefix cache snapshots the prompt (its end too); None: nowhere
    logits: torch.Tensor | None = None  # the prompt's last logits, when the prefix cache held it whole
    decoding: bool = False
    first_token: int | None = None  # chosen from the prompt's logits (on the host): the first step feeds it
    chosen: list[int] = field(default_factory=list)  # every token read back, a stop token included
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None


@dataclass
class Emitted:
    """What a step gave a sequence: a token it keeps (None: none, its stop token or a failure), and, when
    the sequence ended there (its slot is free), why: `finish` "stop" or "length", or `error`."""

    seq: Sequence
    token: int | None = None
    finish: str | None = None
    error: BaseException | None = None


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



class Scheduler:
    def __init__(self, backend: TorchBackend, cache: PrefixCache, max_batch: int, token_budget: int = 512,
                 chunk: int = 256, cuda: CudaOptions = CudaOptions()):
        self.model, self.device, self.cache = backend.model, backend.device, cache
        self.max_batch, self.token_budget, self.chunk = max_batch, token_budget, chunk
        self.capacity = backend.max_context
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
        # one sequence decoding alone: the one-request step (on the CPU always: the same math as the batched)
        self.solo_step = cuda.solo_step or self.device.type != "cuda"
        self._solo_graph: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None
        self.solo_steps = 0
        self._ids_in = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._positions_in = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._live_in = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.ops = self._batch_ops(backend.prompt_copies, cuda)
        self._unread: Step | None = None  # the last step enqueued, its tokens not yet handed out
        self._host_tokens = [torch.zeros(max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
                             for _ in range(2)]  # the steps' tokens land here, alternately
        # a step's tokens, positions and gather indices (4 ints a row at most), or a prompt piece
        self._on_device = HostInts(self.device, max(4 * max_batch, MAX_PIECE))
        self.waiting: deque[Sequence] = deque()  # arrival order
        self.active: list[Sequence] = []  # admission order
        self.decoding: list[Sequence] = []  # slot order: decoding[i].slot == i
        self.batch_size = 0
        self.peak_batch = 0
        self.steps = 0
        # where the driving thread's time goes (/metrics): restoring cached prefixes into slots, prompt
        # pieces, snapshots into the prefix cache, enqueueing batched steps and handing out their tokens,
        # waiting for a step's tokens (the device's time beyond the host's), waiting for work (the driver's)
        self.seconds = Counter(dict.fromkeys(("admit", "prefill", "cache", "decode", "wait", "idle"), 0.0))
        self._inner: list[float] = []  # time of the phases timed inside the open ones
        self._emitted: list[Emitted] = []

    def _batch_ops(self, kept, cuda: CudaOptions) -> StepOps:
        """The reference math with padded rows (int8 weights from a dense copy off the CPU); on CUDA its
        GEMMs with the rows kernels of `kernels/triton_rows.py` around them (without: a 32-row 2B int8hu
        step 8.9 ms on the H200 against 2.5-2.8 ms)."""
        linears = BatchOps(-(-self.max_batch // ROW_TILE) * ROW_TILE, dense=self.device.type != "cpu", kept=kept)
        if self.device.type == "cuda" and triton_installed() and cuda.row_kernels:
            from .kernels.triton_rows import RowStepOps

            return RowStepOps(self._live_in, linears, int8_linears=cuda.int8_rows, pdl=cuda.row_pdl)
        return linears

    # -- what the driver calls --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """A new sequence, waiting for a slot."""
        seq.chunk = seq.chunk or self.chunk
        seq.generator = seq.sampling.generator(self.device)
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def prefill(self) -> list[Emitted]:
        """Admit waiting sequences into free slots and feed prompt pieces under the token budget: the first
        token of each prompt that is now complete (and the sequences that failed)."""
        with self.timed("admit"):
            self._admit()
        budget = self.token_budget - len(self.decoding)
        fed = 0
        for seq in [s for s in self.active if not s.decoding]:
            while not seq.decoding and seq.slot >= 0 and (budget > 0 or not fed):
                with self.timed("prefill"):
                    n = self._prefill_piece(seq)
                budget, fed = budget - n, fed + n
        return self._take_emitted()

    def decode(self) -> list[Emitted]:
        """Enqueue one batched step for the decoding sequences and read the step before it: what each of its
        rows got, in order. A fault of the step itself raises (`fail`)."""
        with self.timed("decode"):
            unread, self._unread = self._unread, self._decode() if self.decoding else None
            if unread is not None:
                with self.timed("wait"):
                    tokens = unread.read()
                self._hand_out(unread.rows, tokens)
        if not self.active:
            self.batch_size = 0
        return self._take_emitted()

    def _take_emitted(self) -> list[Emitted]:
        emitted, self._emitted = self._emitted, []
        return emitted

    def fail(self, error: BaseException) -> list[Emitted]:
        """Every active sequence ends with `error` (a fault of the step itself), its slot freed."""
        for seq in list(self.active):
            self.retire(seq, None, error)
        return self._take_emitted()

    def retire(self, seq: Sequence, reason: str | None, error: BaseException | None = None) -> None:
        """End a sequence: `reason` "stop" / "length" (it ended), "cancelled" (its caller left; the reply so
        far is kept too) or None (it failed: `error`). Its reply's state goes into the prefix cache, its slot
        is freed (the last decoding sequence moves into a decoding hole)."""
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        if reason is not None:
            if reason != "cancelled":
                seq.stats.stop_reason = reason
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
        if error is not None:
            self._emitted.append(Emitted(seq, error=error))

    def warm(self) -> int:
        """Capture the prompt graphs of every piece length up to the chunk now (CUDA; between requests)."""
        return self.prefill_graphs.warm(self.chunk) if self.prefill_graphs is not None else 0

    @contextmanager
    def timed(self, phase: str):
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

    # -- inside a step ------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting.popleft()
            seq.slot = self.owner.index(None, self.max_batch)
            self.owner[seq.slot] = seq
            self.active.append(seq)
            try:
                self._restore(seq)
            except Exception as exc:
                self.retire(seq, None, exc)

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
            self.retire(seq, None, exc)
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
        with self.timed("cache"):
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
        if count == 1 and self.solo_step:
            logits = self._solo(ids, positions, rows[0].pos)
        elif self.padded:
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

    def _solo(self, ids: torch.Tensor, positions: torch.Tensor, position: int) -> torch.Tensor:
        """The one-request step for the sequence in slot 0, its token at `position`: logits [1, V]. On CUDA the
        fused step as a CUDA graph over the pool's whole KV row (the engine's own step on a state of that
        capacity); elsewhere over the attention window the position needs."""
        self.solo_steps += 1
        slot = self.pool.slot(0)
        if not self.use_graphs:
            window = bucket(position + 1, self.capacity)
            return self.model.step(ids.view(1, 1), positions.view(1), slot, window).view(1, -1)
        self._ids_in[:1].copy_(ids)
        self._positions_in[:1].copy_(positions)
        if self._solo_graph is None:
            self._solo_graph = capture(lambda: self.model.step(self._ids_in[:1].view(1, 1), self._positions_in[:1],
                                                               slot, self.capacity), slot)
        graph, out = self._solo_graph
        graph.replay()
        return out.view(1, -1)

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
                    self.retire(seq, None, exc)
        return chosen

    def _hand_out(self, rows: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(rows, tokens):
            if seq.slot >= 0:  # not ended since the step was enqueued
                self._emit(seq, token)

    def _emit(self, seq: Sequence, token: int) -> None:
        """A token read back for a sequence: kept, or where it ends (its slot freed at once)."""
        seq.chosen.append(token)
        now = time.perf_counter()
        stats = seq.stats
        if seq.first is None:
            seq.first = now
            stats.prefill_seconds = now - seq.start
        stats.decode_seconds = now - seq.first
        finish = seq.stops.finish(token, stats.generated_tokens)
        if finish == "stop":
            self.retire(seq, "stop")
            self._emitted.append(Emitted(seq, finish="stop"))
            return
        stats.generated_tokens += 1
        self._emitted.append(Emitted(seq, token, finish))
        if finish == "length":
            self.retire(seq, "length")
