"""One log line per request (method, path, status, tokens, time), and `nosniff` on every response.

The line goes to the `lmbundle.serve` logger at INFO, which `lmbundle serve` shows with --log-requests or
--verbose (quiet by default). Tokens are those of a completion (prompt + generated), read from the reply the
route left in the request's state; a streamed answer is logged once its last event has gone.
"""

from __future__ import annotations

import logging
import time

LOG = logging.getLogger("lmbundle.serve")
NOSNIFF = (b"x-content-type-options", b"nosniff")


class RequestLog:
    """ASGI middleware: the request's log line when `enabled`; the nosniff header always."""

    def __init__(self, app, enabled: bool):
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), NOSNIFF]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if self.enabled:
                LOG.info("%s %s %d%s %.3f s", scope["method"], scope["path"], status or 500,
                         tokens(scope.get("state", {}).get("reply")), time.perf_counter() - start)


def tokens(reply) -> str:
    """" 12+34 tokens" (prompt + generated) for a completion's reply, else ""."""
    if reply is None:
        return ""
    generated = reply.stats.generated_tokens if reply.stats is not None else 0
    return f" {reply.prompt_tokens}+{generated} tokens"
