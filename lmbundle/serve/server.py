"""The HTTP server around the app (uvicorn): what a connection may cost before any route runs.

uvicorn bounds neither how long a request's headers may take nor how many connections stay open: a client
that opens connections and sends half a request holds each one forever, and past the process's file
descriptor limit every accept fails (EMFILE), for everyone. Here:
- the descriptor limit is raised to the hard limit at start, and connections are capped below it
  (`--max-connections`, lowered to fit, `Limits`): one past the cap is answered 503 at once and closed;
- a request's headers must arrive within `--read-timeout` seconds of the connection (or of the previous
  answer on a kept-alive one), else 408 and the connection is closed; its body has as long again
  (`app.read_body`); a kept-alive connection idle for `--idle-timeout` seconds is closed.
On SIGTERM / SIGINT the decode stops first, so open streams end with a last event (app.py).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from dataclasses import dataclass

from ..engine.engine import Engine
from .app import Options, create_app

RESERVED_FDS = 64  # descriptors kept free beyond those open at start (files, pipes, the prefix cache's spills)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the (new) soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


@dataclass(frozen=True)
class Limits:
    """How the descriptors left after start are spent. asyncio accepts up to `backlog` connections in one go
    before any is looked at, so that many must always be free; of the rest, `cap` serve requests and as many
    again may be refused politely (the 503 written, the socket held until the client has read it); past
    `refuse_at` open connections the 503 is written and the socket closed at once. So no accept fails."""

    cap: int
    refuse_at: int
    backlog: int

    @classmethod
    def fitting(cls, requested: int) -> "Limits":
        soft = raise_fd_limit()
        try:
            open_now = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_now = 64
        budget = max(8, soft - open_now - RESERVED_FDS)
        backlog = min(2048, max(4, budget // 4))
        refuse_at = max(2, budget - backlog)
        return cls(cap=max(1, min(requested, refuse_at // 2)), refuse_at=refuse_at, backlog=backlog)


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nretry-after: 1\r\n\r\n").encode() + body


def bounded_protocol(limits: Limits, read_timeout: float):
    """uvicorn's h11 protocol with the connection cap and the header deadline (see the module)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _raw_response(503, "Service Unavailable", f"server busy: {limits.cap} connections open, "
                         "retry later", "too_many_connections")
    late = _raw_response(408, "Request Timeout", f"request headers not received within {read_timeout:g} s",
                         "request_timeout")

    class BoundedProtocol(H11Protocol):
        refused = False
        deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.cap:
                # answered before its request is read; the write side closes now, the socket once the
                # client has read (its EOF) or after a second, so the answer is not lost to a reset
                self.refused = True
                transport.write(busy)
                if len(self.connections) > limits.refuse_at:
                    transport.close()
                    return
                if transport.can_write_eof():
                    transport.write_eof()
                self.loop.call_later(1.0, transport.close)
                return
            self.arm()

        def waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def arm(self) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(read_timeout, self.headers_late)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def headers_late(self) -> None:
            self.deadline = None
            if self.waiting_for_headers() and not self.transport.is_closing():
                self.transport.write(late)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            super().data_received(data)
            if self.deadline is not None and not self.waiting_for_headers():
                self.disarm()

        def eof_received(self):
            if self.refused:
                self.transport.close()
            return super().eof_received()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.waiting_for_headers():
                self.arm()  # the next request on this kept-alive connection

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return BoundedProtocol


def serve(engine: Engine, options: Options) -> None:
    """Serve `engine` until SIGTERM / SIGINT (uvicorn)."""
    import uvicorn

    if engine.scheduler is not None:
        # the request threads wake once per token each: at Python's default 5 ms thread switch interval the
        # batch loop waits that long for the GIL after every step (6 ms steps at one row on the H200), so
        # this process switches every 0.2 ms
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
    limits = Limits.fitting(options.max_connections)
    if limits.cap < options.max_connections:
        print(f"note: at most {limits.cap} connections (the open-file limit, ulimit -n, leaves no room for "
              f"{options.max_connections})", file=sys.stderr)
    if options.log_requests:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log = logging.getLogger("lmbundle.serve")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(engine, options)
    if options.remote:
        print(f"warning: listening on {options.host}: any machine that can reach this port can use the model"
              + ("" if options.api_key else " (no API key set: anyone)"), file=sys.stderr)
    shown = f"[{options.host}]" if ":" in options.host else options.host
    print(f"{app.state.model_name} ({engine.backend_name} on {engine.device}): chat page "
          f"http://{shown}:{options.port}/ , OpenAI API http://{shown}:{options.port}/v1", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM / SIGINT: stop the decode first, so every stream still open ends with a last chunk
            # (finish_reason "error") and an error event instead of being cut when the connections close
            app.state.worker.stop_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=3, timeout_keep_alive=options.idle_timeout,
                            backlog=limits.backlog, http=bounded_protocol(limits, options.read_timeout))
    Server(config).run()
