"""`lmbundle serve`: an OpenAI-compatible HTTP API and a web chat page over one engine.

The path of a request: the route reads and validates the JSON (schemas.py), the protocol turns it into the
engine's `Request` (protocol.py; images decoded here, off the event loop), a worker thread builds its
prompt and iterates `Engine.generate` (worker.py), and its `Output`s come back to the event loop, where one
assembler makes the stream's chunks or the whole answer (replies.py). Errors leave in OpenAI's error shape,
with 4xx for what the client can fix (the engine's errors mapped in `as_api_error`). The server listens on
loopback unless the operator explicitly opts in (guard.py); what a connection may cost is bounded around the
app (server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..engine.engine import Engine
from ..engine.grammar import GrammarError
from ..engine.request import Request as EngineRequest
from ..errors import ContextTooLong, LmbundleError, TemplateError
from .access_log import RequestLog
from .guard import Guard, check_host, loopback_hosts
from .images import ImageError, give_back_memory, resolve_dirs
from .metrics import Metrics
from .metrics import health as health_report
from .protocol import Protocol
from .replies import Reply, Shapes, sse
from .schemas import ApiError, ChatRequest, CompletionRequest, decode_json, parse
from .tools import OutputParser
from .worker import Job, QueueFull, Worker, run_request

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MB image as base64 plus the conversation
LARGE_BODY_BYTES = 1 << 20  # decoded off the event loop, and the memory given back after
# the web page: its own script, style and images (attachments are data: URLs), never inside another site's frame
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    timeout: float = 300.0
    queue_size: int = 16
    max_batch: int = 1  # requests decoded at once (--max-batch): the worker threads
    allowed_dirs: list[Path] = field(default_factory=list)
    hosts: set[str] | None = None  # accepted Host headers; None accepts any
    remote: bool = False  # listening on a non-loopback address (--allow-remote)
    model_name: str | None = None  # the model's name in the API (--served-model-name); None: the bundle's
    cors_origins: list[str] = field(default_factory=list)  # web origins whose pages may call the API
    log_requests: bool = False  # one log line per request (--log-requests, --verbose)
    read_timeout: float = 30.0  # seconds for a request's headers, and again for its body
    idle_timeout: float = 5.0  # seconds a kept-alive connection may wait for its next request
    max_connections: int = 1000


def options_from(args) -> Options:
    """`lmbundle serve`'s options, checked before any bundle is opened."""
    loopback = check_host(args.host, args.allow_remote)
    if args.queue_size < 0 or args.timeout <= 0 or args.max_batch < 1:
        raise LmbundleError("--queue-size must be >= 0, --max-batch >= 1 and --timeout > 0")
    if args.read_timeout <= 0 or args.idle_timeout <= 0 or args.max_connections < 1:
        raise LmbundleError("--read-timeout and --idle-timeout must be > 0, --max-connections >= 1")
    for origin in args.cors_origin or []:
        if origin != "*" and not (origin.startswith(("http://", "https://")) and origin.count("/") == 2):
            raise LmbundleError(f"--cors-origin {origin!r}: an origin is scheme://host[:port] (or *)")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise LmbundleError("--served-model-name must not be empty")
    api_key = args.api_key or os.environ.get("LMBUNDLE_API_KEY") or None  # the variable stays out of `ps`
    return Options(host=args.host, port=args.port, api_key=api_key, timeout=args.timeout, queue_size=args.queue_size,
                   max_batch=args.max_batch, allowed_dirs=resolve_dirs(args.allow_files or []),
                   hosts=loopback_hosts(args.port) if loopback else None, remote=not loopback,
                   model_name=args.served_model_name, cors_origins=list(args.cors_origin or []),
                   log_requests=args.log_requests or args.verbose, read_timeout=args.read_timeout,
                   idle_timeout=args.idle_timeout, max_connections=args.max_connections)


class GiveBackMemory:
    """ASGI middleware: once a request with a large body is done, its objects are freed (those an error's
    traceback holds in a reference cycle too) and the heap's free pages go back to the OS (glibc keeps large
    freed blocks): a 30 MB body's copies would otherwise stay in the RSS, more with every such request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.get("state", {}).get("large"):
                gc.collect()
                await run_in_threadpool(give_back_memory)


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


def as_api_error(exc: BaseException) -> ApiError:
    """An error as the client sees it: the engine's errors about the request are 4xx, anything else 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TemplateError):
        return ApiError(400, str(exc), param="messages")
    if isinstance(exc, ImageError):
        return ApiError(400, str(exc), code="invalid_image")
    if isinstance(exc, GrammarError):
        return ApiError(400, str(exc), code="invalid_response_format", param="response_format")
    if isinstance(exc, ContextTooLong):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, LmbundleError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")


class JobEvents:
    """The request's side of a job: its events in order, its time limit, and, when `watch` is on, a
    look every 0.25 s at whether the client is still there (streams leave that to Starlette, which
    cancels them when the client goes)."""

    def __init__(self, job: Job, request: Request, timeout: float, watch: bool,
                 closing: Callable[[], bool] = lambda: False):
        self.job, self.request, self.timeout, self.watch, self.closing = job, request, timeout, watch, closing
        self.last_look = time.monotonic()

    async def next(self):
        """The next event; raises ApiError for the job's errors and its time limit, ClientGone."""
        job = self.job
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                raise self.timed_out()
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=min(remaining, 0.25))
            except asyncio.TimeoutError:
                event = None
            if self.watch and time.monotonic() - self.last_look >= 0.25:
                self.last_look = time.monotonic()
                if await self.request.is_disconnected():
                    raise ClientGone()
            if event is None:
                continue
            if event.kind == "error":
                raise as_api_error(event.value)
            if event.kind == "end":  # the worker stopped the job early
                if job.timed_out:
                    raise self.timed_out()
                if self.closing():
                    raise ApiError(503, "the server is shutting down; retry on another server or later",
                                   code="server_shutdown")
                raise ClientGone()
            return event

    def timed_out(self) -> ApiError:
        return ApiError(504, f"request timed out after {self.timeout:g} s", code="timeout")


async def read_body(request: Request, schema, model: str, worker: Worker, read_timeout: float):
    """The request's JSON, validated against `schema`: its size bounded while it is read (within
    `read_timeout` seconds), its nesting and text checked (off the event loop when large), the model it
    names this server's, and the server not already full."""
    limit_error = ApiError(413, f"request body over {MAX_BODY_BYTES // 2**20} MB", code="body_too_large")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "Content-Length is not a number") from None
    if declared > MAX_BODY_BYTES:
        raise limit_error
    chunks, size = [], 0
    try:
        async with asyncio.timeout(read_timeout):
            async for chunk in request.stream():  # a chunked body has no Content-Length: stop at the limit
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise limit_error
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"request body not received within {read_timeout:g} s", code="request_timeout") from None
    raw = b"".join(chunks)
    del chunks
    if size > LARGE_BODY_BYTES:
        request.state.large = True
        req = await run_in_threadpool(lambda: parse(schema, decode_json(raw)))
    else:
        req = parse(schema, decode_json(raw))
    if req.model not in (None, model):
        raise ApiError(404, f"model {req.model!r} not found: this server serves {model!r}",
                       code="model_not_found", param="model")
    if worker.full:  # answer a busy server before decoding any image
        raise ApiError(429, "server busy: the request queue is full, retry later", code="queue_full")
    return req


def create_app(engine: Engine, options: Options) -> FastAPI:
    worker = Worker(options.queue_size, options.max_batch)
    metrics = Metrics(engine, worker)
    protocol = Protocol(engine, options.allowed_dirs)
    name = options.model_name or engine.name

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()
        engine.close()

    app = FastAPI(title="lmbundle", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker, app.state.model_name = worker, name
    app.add_middleware(Guard, key=options.api_key, hosts=options.hosts)
    if options.cors_origins:  # outside the guard: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=options.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(GiveBackMemory)
    app.add_middleware(RequestLog, enabled=options.log_requests)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else {"Connection": "close"} if exc.status == 408 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(request, exc):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(LmbundleError)  # a client's mistake found late (a template's refusal): its 4xx
    @app.exception_handler(Exception)
    async def _internal(request, exc):
        error = as_api_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "lmbundle",
                "max_context": engine.max_context, "vision": engine.is_vlm, "backend": engine.backend_name,
                "device": str(engine.device)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health(request: Request):
        """Open to load balancers without the key: {"status": "ok"}, 503 while shutting down; with the key
        (or none set) the whole report."""
        if worker.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return health_report(name, engine, worker) if request.state.authorized else {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(404, f"model {model_id!r} not found: this server serves {name!r}", code="model_not_found",
                           param="model")
        return model_card()

    @app.get("/api/info")
    async def info():
        return {**model_card(), "defaults": protocol.defaults}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest, name, worker, options.read_timeout)
        work, tools = await protocol.chat(req)
        return await answer(request, req, work, tools)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest, name, worker, options.read_timeout)
        return await answer(request, req, protocol.completion(req))

    async def answer(request: Request, req, work: EngineRequest, tools: list[dict] | None = None):
        """Build the prompt (tokenizing on a thread of its own, not a decode worker's nor the event loop), run
        `work` on a worker thread; its Outputs make the stream or the whole answer."""
        try:
            prompt = await run_in_threadpool(engine.prompt, work)
        except Exception as exc:  # a template's refusal, a prompt past the context: the answer, not a traceback
            raise as_api_error(exc) from None
        try:
            job = worker.submit(lambda j: run_request(engine, work, prompt, j), options.timeout)
        except QueueFull:
            if worker.closing:
                raise ApiError(503, "the server is shutting down", code="server_shutdown") from None
            raise ApiError(429, "server busy: the request queue is full, retry later", code="queue_full") from None
        chat = isinstance(req, ChatRequest)
        events = JobEvents(job, request, options.timeout, watch=True, closing=lambda: worker.closing)
        try:
            thinking = chat and prompt.opens_thinking and work.grammar is None
            parser = OutputParser(thinking, tools) if chat else None
            reply = request.state.reply = Reply(Shapes(chat, name), len(prompt.ids), parser, engine.token_bytes,
                                                req.top_count is not None, req.return_tokens_as_token_ids)
            if req.stream:
                events.watch = False
                return StreamingResponse(stream(events, reply, req.include_usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while not reply.finished:
                reply.add((await events.next()).value)
            return reply.body()
        except BaseException:
            job.cancel()
            raise

    async def stream(events: JobEvents, reply: Reply, include_usage: bool):
        try:
            if reply.shapes.chat:
                yield sse(reply.first_chunk())
            while not reply.finished:
                for chunk in reply.add((await events.next()).value):
                    yield sse(chunk)
            if include_usage:
                yield sse(reply.usage_chunk())
            yield sse("[DONE]")
        except ApiError as exc:  # headers are gone: a last chunk says the answer ended, then the error itself
            yield sse(reply.error_chunk())
            yield sse(exc.body())
        except ClientGone:
            return
        finally:
            events.job.cancel()

    return app
