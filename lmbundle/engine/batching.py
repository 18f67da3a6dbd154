"""The one loop that drives the batch scheduler, and the requests' side of it.

A request's thread (`BatchLoop.generate`) hands its sequence to the loop and reads its tokens back from a
queue; the loop thread takes new sequences in, retires those whose caller left, has the scheduler feed prompt
pieces and run a batched step (`Scheduler.prefill`, `Scheduler.decode`) and passes each sequence's tokens on. Tokens go to a request's thread in frames (its first at once): with 32
rows stepping every ~2.5 ms, each request thread then wakes, and takes the GIL from the loop, a fraction as
often, and 10 ms of tokens at a time stream as smoothly to a reader. The loop sets nothing process-wide
(`lmbundle serve` shortens Python's thread switch interval for it: serve/app.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .outputs import TokenStops
from .request import Stats
from .sampling import Sampling
from .scheduler import Emitted, Scheduler, Sequence

# a request's tokens go to its thread at most this often (its first at once)...
STREAM_FRAME_S = 0.01
# ...and all requests' frames together about this often at most (longer frames when many decode): each
# frame becomes a streamed chunk, and the HTTP loop's sends compete with this loop for the GIL
STREAM_FRAMES_PER_S = 1000


@dataclass(eq=False)
class Ticket(Sequence):
    """A sequence with its way back to the request's thread."""

    out: queue.Queue = field(default_factory=queue.Queue)  # lists of tokens, then None (or an error, None)
    unsent: list[int] = field(default_factory=list)  # tokens not yet put on `out`
    sent: float = 0.0  # when `out` was last given tokens
    cancelled: threading.Event = field(default_factory=threading.Event)


class BatchLoop:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._new: list[Ticket] = []  # handed in by request threads
        self._live: list[Ticket] = []  # added to the scheduler and not ended
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="lmbundle-batch", daemon=True)
        self._thread.start()

    # -- the requests' side ---------------------------------------------------------------------
    def generate(self, ids: list[int], stops: TokenStops, sampling: Sampling, chunk: int,
                 stats: Stats) -> Iterator[int]:
        """The request's tokens as the loop reads them back (the stop token is not one); closing the
        iterator retires the request."""
        ticket = Ticket(list(ids), stops, sampling, stats, chunk)
        with self._wake:
            self._new.append(ticket)
            self._wake.notify()
        try:
            while (item := ticket.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            ticket.cancelled.set()
            with self._wake:
                self._wake.notify()

    def close(self) -> None:
        self._closing = True
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=5)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        scheduler = self.scheduler
        with torch.inference_mode():
            while not self._closing:
                with self._wake:
                    new, self._new = self._new, []
                    for ticket in new:
                        scheduler.add(ticket)
                        self._live.append(ticket)
                    if scheduler.idle:
                        with scheduler.timed("idle"):
                            self._wake.wait(timeout=1.0)
                        continue
                for ticket in [t for t in self._live if t.cancelled.is_set()]:
                    scheduler.retire(ticket, "cancelled")
                    self._end(ticket)
                try:
                    self._pass_on(scheduler.prefill())  # prompts' first tokens go out before the step
                    self._pass_on(scheduler.decode())
                except Exception as exc:  # a fault of the step itself: every request in it fails, slots free
                    self._pass_on(scheduler.fail(exc))

    def _pass_on(self, emitted: list[Emitted]) -> None:
        now = time.perf_counter()
        frame = max(STREAM_FRAME_S, len(self.scheduler.decoding) / STREAM_FRAMES_PER_S)
        for event in emitted:
            ticket = event.seq
            if event.token is not None:
                ticket.unsent.append(event.token)
                if now - ticket.sent >= frame:
                    ticket.out.put(ticket.unsent)
                    ticket.unsent, ticket.sent = [], now
            if event.finish is not None or event.error is not None:
                self._end(ticket, event.error)

    def _end(self, ticket: Ticket, error: BaseException | None = None) -> None:
        """The rest of a ticket's tokens, then the end (after its error, if it failed)."""
        if ticket not in self._live:
            return
        self._live.remove(ticket)
        if ticket.unsent:
            ticket.out.put(ticket.unsent)
            ticket.unsent = []
        if error is not None:
            ticket.out.put(error)
        ticket.out.put(None)
