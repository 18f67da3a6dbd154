"""One decode at a time: a single worker thread serves jobs in arrival order from a bounded queue.

The engine holds one model and one state cache, so requests cannot interleave; a FIFO keeps waiting
fair and the bound turns overload into an immediate "busy" answer instead of an ever-growing wait.
A job talks back to its request (on the event loop) through an asyncio queue of events, and the
request tells the job to stop (client gone, time limit) through a flag the job checks every token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class QueueFull(Exception):
    """Every waiting slot is taken."""


class JobStopped(Exception):
    """The job was told to stop: its client went away or its time limit passed."""


@dataclass
class Event:
    kind: str  # what the job produced: "prompt", "text", "done", "error"; the worker adds "end" last
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

    def emit(self, kind: str, value: object = None) -> None:
        """Called on the worker thread; delivers to the request's event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, value))

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
    """The thread that runs jobs one after another."""

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running: Job | None = None
        self.served = 0
        self.stopped = 0  # jobs ended early: client gone or time limit
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="lmbundle-decode", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def full(self) -> bool:
        """Every slot taken: the running job's and the `queue_size` waiting ones."""
        return self._waiting + (self.running is not None) > self.queue_size

    def submit(self, work: Callable[[Job], None], timeout: float) -> Job:
        """Queue `work` (run as work(job) on the worker thread) or raise QueueFull."""
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
        """Stop the running job and every waiting one, and take no more (the server is shutting down);
        returns at once (the signal handler runs on the event loop)."""
        with self._lock:
            self._closing = True
            running = self.running
        if running is not None:
            running.cancel()
        for job in list(self._queue.queue):
            if job is not None:
                job.cancel()

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop the running job, drop the waiting ones, end the thread."""
        self._closing = True
        if (job := self.running) is not None:
            job.cancel()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.state == "dropped":
                    continue
                job.state = "running"
                self._waiting -= 1
                self.running = job
            if self._closing:
                job.cancel()
            try:
                job.check()
                job.work(job)
                self.served += 1
            except JobStopped:
                self.stopped += 1
            except Exception as exc:  # reported to the request, never kills the worker
                job.emit("error", exc)
            finally:
                with self._lock:
                    self.running = None
                    job.state = "done"
                job.emit("end")
