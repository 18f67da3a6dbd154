"""What every request must pass before any route runs (`Guard`), and where the server may listen."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi.responses import JSONResponse

from ..errors import LmbundleError
from .schemas import ApiError

# the page itself (it asks for the key when the API answers 401), and the health check load balancers probe
# (without the key it says only {"status": "ok"}: app.py)
PUBLIC_PATHS = ("/", "/favicon.ico", "/health")


class Guard:
    """ASGI middleware for what every request must pass, before any route runs:
    - the API key (when set), on everything but the page and /health; whether the request carried it is
      left in the request's state (`authorized`) for the routes that answer both;
    - a Host header naming this server when it listens on loopback, so a web page elsewhere cannot
      reach the model through DNS rebinding;
    - JSON bodies declared as such: a cross-site form or text/plain POST is refused, never run."""

    def __init__(self, app, key: str | None, hosts: set[str] | None):
        self.app = app
        self.key = key.encode() if key else None
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (problem := self.problem(scope)):
            await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def problem(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.hosts is not None and headers.get(b"host", b"").decode("latin-1").lower() not in self.hosts:
            return ApiError(403, "Host header does not name this server", code="forbidden_host")
        path = scope["path"]
        public = path in PUBLIC_PATHS or path.startswith("/static/")
        authorized = not self.key or self.authorized(headers.get(b"authorization", b""))
        scope.setdefault("state", {})["authorized"] = authorized
        if not public and not authorized:
            return ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                            code="invalid_api_key")
        media_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if scope["method"] == "POST" and media_type != b"application/json":
            return ApiError(415, "send the request body as Content-Type: application/json",
                            code="unsupported_media_type")
        return None

    def authorized(self, header: bytes) -> bool:
        """`Bearer <key>`, the scheme in any case (RFC 9110: auth schemes are case-insensitive)."""
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def check_host(host: str, allow_remote: bool) -> bool:
    """True when the address is loopback; a remote one without --allow-remote is refused."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise LmbundleError(f"refusing to listen on {host}: other machines could reach the model. "
                            "Pass --allow-remote to accept that (and set --api-key)")
    return loopback


def loopback_hosts(port: int) -> set[str]:
    return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
