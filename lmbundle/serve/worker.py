"""The decode workers: up to `max_batch` jobs run at once, the rest wait in arrival order in a bounded queue.

Each running job has its own thread; the engine decides how they share the device (a batching engine
steps them together, one step per token for all; a one-request engine takes them in turn). A FIFO keeps
waiting fair and the bound turns overload into an immediate "busy" answer (429 once every slot and
every waiting place is taken) instead of an ever-growing wait. A job talks back to its request (on the
event loop) through an asyncio queue of events, and the request tells the job to stop (client gone,
time limit) through a flag the job checks every token. The job of a request is `run_request`: the
engine's Outputs for its prompt (built before the job is queued, so a decode worker never tokenizes).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.engine import Engine
from ..engine.prompt import Prompt
from ..engine.request import Request


class QueueFull(Exception):
    """Every waiting slot is taken."""


class JobStopped(Exception):
    """The job was told to stop: its client went away or its time limit passed."""


@dataclass
class Event:
    kind: str  # what the job produced: "outputs", "error"; the worker adds "end" last
    value: object = None


class Job:
    def __init__(self, work: Callable[["Job"], None], loop: asyncio.AbstractEventLoop, deadline: float):
        self.work = work
        self.loop = loop
        self.deadline = deadline  # time.monotonic() value
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.on_cancel: Callable[["Job"], None] | None = None  # the worker drops a queued job at once
        self.state = "queued"  # -> "running" -> "done"; or "dropped" when cancelled while queued
        self._outputs: list | None = None  # engine Outputs emitted but not yet on the loop
        self._outputs_lock = threading.Lock()

    def emit(self, kind: str, value: object = None) -> None:
        """Called on the worker thread; delivers to the request's event loop. An "output" (one engine Output)
        joins the "outputs" event still on its way when there is one: under load the loop wakes once per
        batch of tokens, not once per token, and the stream sends fewer, longer chunks."""
        if kind == "output":
            with self._outputs_lock:
                if self._outputs is not None:
                    self._outputs.append(value)
                    return
                self._outputs = [value]
            self.loop.call_soon_threadsafe(self._deliver_outputs)
            return
        self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, value))

    def _deliver_outputs(self) -> None:
        with self._outputs_lock:
            value, self._outputs = self._outputs, None
        self.events.put_nowait(Event("outputs", value))

    @property
    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def check(self) -> None:
        """Raise JobStopped if the job should stop now (called between tokens)."""
        if self.cancelled.is_set() or self.timed_out:
            raise JobStopped()

    def cancel(self) -> None:
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(self)


class Worker:
    """`max_batch` threads that take jobs from one FIFO."""

    def __init__(self, queue_size: int, max_batch: int = 1):
        self.queue_size = queue_size
        self.max_batch = max(1, max_batch)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.active: set[Job] = set()
        self.served = 0
        self.stopped = 0  # jobs ended early: client gone or time limit
        self.failed = 0
        self._closing = False
        self._threads = [threading.Thread(target=self._loop, name=f"lmbundle-decode-{i}", daemon=True)
                         for i in range(self.max_batch)]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def full(self) -> bool:
        """Every slot taken: the `max_batch` running jobs' and the `queue_size` waiting ones."""
        return self._waiting + len(self.active) >= self.queue_size + self.max_batch

    def submit(self, work: Callable[[Job], None], timeout: float) -> Job:
        """Queue `work` (run as work(job) on a worker thread) or raise QueueFull."""
        job = Job(work, asyncio.get_running_loop(), time.monotonic() + timeout)
        with self._lock:
            if self._closing or self.full:
                raise QueueFull()
            self._waiting += 1
        job.on_cancel = self._drop
        self._queue.put(job)
        return job

    def _drop(self, job: Job) -> None:
        """A queued job whose client left (or the server is stopping) gives its slot back now, not when
        its turn comes: otherwise gone clients keep the queue full and new requests get 429."""
        with self._lock:
            if job.state != "queued":
                return
            job.state = "dropped"
            self._waiting -= 1
            self.stopped += 1
        job.emit("end")

    def stop_all(self) -> None:
        """Stop the running jobs and every waiting one, and take no more (the server is shutting down);
        returns at once (the signal handler runs on the event loop)."""
        with self._lock:
            self._closing = True
            running = list(self.active)
        for job in running:
            job.cancel()
        for job in list(self._queue.queue):
            if job is not None:
                job.cancel()

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop the running jobs, drop the waiting ones, end the threads."""
        self._closing = True
        for job in list(self.active):
            job.cancel()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.state == "dropped":
                    continue
                job.state = "running"
                self._waiting -= 1
                self.active.add(job)
            if self._closing:
                job.cancel()
            outcome = "served"
            try:
                job.check()
                job.work(job)
            except JobStopped:
                outcome = "stopped"
            except Exception as exc:  # reported to the request, never kills the worker
                outcome = "failed"
                job.emit("error", exc)
            finally:
                with self._lock:
                    self.active.discard(job)
                    job.state = "done"
                    setattr(self, outcome, getattr(self, outcome) + 1)
                job.emit("end")


def run_request(engine: Engine, request: Request, prompt: Prompt, job: Job) -> None:
    """A request's job, on a worker thread: the engine's Outputs for its prompt as they come (events "outputs";
    the last Output has the finish reason)."""
    outputs = engine.generate(request, prompt)
    try:
        for output in outputs:
            job.check()
            job.emit("output", output)
    finally:
        outputs.close()
