"""`lmbundle serve`: an OpenAI-compatible HTTP API and a web chat page over one bundle.

Requests are parsed and their images decoded on the event loop's side; the prompt is built and
decoded on the single worker thread (worker.py). Errors leave in OpenAI's error shape, with 4xx for
what the client can fix. The server listens on loopback unless the operator explicitly opts in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import GenerationStats, StreamDecoder
from ..engine.sampling import Sampling
from ..errors import LmbundleError
from .images import ImageError, decode_image_url, resolve_dirs
from .openai_api import ApiError, ChatRequest, CompletionRequest, ImagePart, Shapes, StopMatcher, parse, timings, usage
from .worker import Job, QueueFull, Worker

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MB image as base64 plus the conversation
PUBLIC_PATHS = ("/", "/favicon.ico")  # the page itself; it asks for the key when the API answers 401


@dataclass
class Options:
    api_key: str | None = None
    timeout: float = 300.0
    queue_size: int = 16
    allowed_dirs: list[Path] = field(default_factory=list)
    hosts: set[str] | None = None  # accepted Host headers; None accepts any
    prefill_chunk: int = 0  # 0: the prompt as S=1 steps (--prefill s1)


@dataclass
class Generation:
    """What the worker needs to run one request."""

    build_ids: Callable[[], list[int]]  # runs on the worker thread (the tokenizer is not shared)
    max_tokens: int | None  # None: up to the context
    sampling: Sampling
    stops: list[str]
    prefill_chunk: int = 0


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


def run_generation(engine, gen: Generation, job: Job) -> None:
    """Worker side: build the prompt, decode, stream text out, stop at EOS / stop string / limit."""
    ids = gen.build_ids()
    limit = gen.max_tokens if gen.max_tokens is not None else engine.max_context - len(ids)
    engine.check_length(len(ids), max(limit, 1))
    job.emit("prompt", len(ids))
    stats = GenerationStats()
    decoder = StreamDecoder(engine.tokenizer)
    matcher = StopMatcher(gen.stops)
    tokens = engine.generate(ids, max_new_tokens=limit, sampling=gen.sampling, prefill_chunk=gen.prefill_chunk,
                             stats=stats)
    finish = None
    try:
        for token in tokens:
            job.check()
            text, hit = matcher.push(decoder.push(token))
            if text:
                job.emit("text", text)
            if hit:
                finish = "stop"
                break
    finally:
        tokens.close()
    if finish is None:
        if tail := matcher.push(decoder.flush())[0] + matcher.flush():
            job.emit("text", tail)
        finish = stats.stop_reason
    job.emit("done", (finish, stats))


def as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageError):
        return ApiError(400, str(exc), code="invalid_image")
    if isinstance(exc, LmbundleError):
        text = str(exc)
        return ApiError(400, text, code="context_length_exceeded" if text.startswith("context too long") else None)
    return ApiError(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")


class JobEvents:
    """The request's side of a job: its events in order, its time limit, and, when `watch` is on, a
    look every 0.25 s at whether the client is still there (streams leave that to Starlette, which
    cancels them when the client goes)."""

    def __init__(self, job: Job, request: Request, timeout: float, watch: bool):
        self.job, self.request, self.timeout, self.watch = job, request, timeout, watch
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
                raise self.timed_out() if job.timed_out else ClientGone()
            return event

    def timed_out(self) -> ApiError:
        return ApiError(504, f"request timed out after {self.timeout:g} s", code="timeout")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Guard:
    """ASGI middleware for what every request must pass, before any route runs:
    - the API key (when set), on everything but the page itself, which asks for it on a 401;
    - a Host header naming this server when it listens on loopback, so a web page elsewhere cannot
      reach the model through DNS rebinding;
    - JSON bodies declared as such: a cross-site form or text/plain POST is refused, never run."""

    def __init__(self, app, key: str | None, hosts: set[str] | None):
        self.app = app
        self.expected = f"Bearer {key}".encode() if key else None
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
        if self.expected and not public and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                                    self.expected):
            return ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                            code="invalid_api_key")
        if scope["method"] == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            return ApiError(415, "send the request body as Content-Type: application/json",
                            code="unsupported_media_type")
        return None


def default_sampling(engine) -> dict:
    """The checkpoint's recommended sampling (generation_config.json), else OpenAI's defaults."""
    path = Path(engine.bundle.tokenizer_path) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    sampled = config.get("do_sample", True)
    return {"temperature": float(config.get("temperature", 1.0)) if sampled else 0.0,
            "top_p": float(config.get("top_p", 1.0)), "top_k": int(config.get("top_k", 0) or 0)}


def create_app(engine, options: Options) -> FastAPI:
    worker = Worker(options.queue_size)
    defaults = default_sampling(engine)
    vision = bool(getattr(engine, "is_vlm", False))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="lmbundle", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(Guard, key=options.api_key, hosts=options.hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(request, exc):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return JSONResponse(as_api_error(exc).body(), status_code=500)

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": int(Path(engine.bundle.path).stat().st_mtime),
                "owned_by": "lmbundle", "max_context": engine.max_context, "vision": vision,
                "backend": engine.backend_name, "device": str(engine.device)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "running": worker.running is not None,
                "waiting": worker.waiting, "queue_size": worker.queue_size, "served": worker.served,
                "stopped": worker.stopped}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/api/info")
    async def info():
        return {**model_card(), "defaults": defaults}

    async def read_body(request: Request, schema):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES // 2**20} MB")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES // 2**20} MB")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
        req = parse(schema, body)
        if req.model not in (None, engine.name):
            raise ApiError(404, f"model {req.model!r} not found: this server serves {engine.name!r}",
                           code="model_not_found", param="model")
        if worker.full:  # answer a busy server before decoding any image
            raise ApiError(429, "server busy: the request queue is full, retry later", code="queue_full")
        return req

    def sampling_of(req) -> Sampling:
        given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
        return Sampling(**{key: defaults[key] if value is None else value for key, value in given.items()},
                        seed=req.seed)

    async def chat_messages(req: ChatRequest) -> list[dict]:
        messages, has_image = [], False
        for i, message in enumerate(req.messages):
            role = "system" if message.role == "developer" else message.role
            if not isinstance(message.content, list):
                messages.append({"role": role, "content": message.content or ""})
                continue
            parts = []
            for part in message.content:
                if isinstance(part, ImagePart):
                    try:
                        image = await run_in_threadpool(decode_image_url, part.url, options.allowed_dirs)
                    except ImageError as exc:
                        raise ApiError(400, f"messages[{i}]: {exc}", code="invalid_image", param="messages") from None
                    parts.append({"type": "image", "image": image})
                    has_image = True
                else:
                    parts.append({"type": "text", "text": part.text})
            if not any(p["type"] == "image" for p in parts):  # plain text renders with every template
                parts = "\n".join(p["text"] for p in parts)
            messages.append({"role": role, "content": parts})
        if has_image and not vision:
            raise ApiError(400, f"this bundle has no vision encoder: {engine.name} takes text only",
                           code="invalid_image", param="messages")
        return messages

    def completion_ids(prompt) -> Callable[[], list[int]]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = len(engine.tokenizer)
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return lambda: list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "exactly one prompt per request", param="prompt")
            prompt = prompt[0]
        return lambda: engine.encode(prompt)

    async def answer(request: Request, req, chat: bool, build_ids: Callable[[], list[int]]):
        gen = Generation(build_ids, req.token_limit, sampling_of(req), req.stop_strings, options.prefill_chunk)
        try:
            job = worker.submit(lambda j: run_generation(engine, gen, j), options.timeout)
        except QueueFull:
            raise ApiError(429, "server busy: the request queue is full, retry later", code="queue_full") from None
        shapes = Shapes(chat, engine.name)
        events = JobEvents(job, request, options.timeout, watch=True)
        try:
            prompt_tokens = (await events.next()).value
            if req.stream:
                events.watch = False
                return StreamingResponse(stream(events, shapes, prompt_tokens, req.include_usage),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            pieces = []
            while (event := await events.next()).kind == "text":
                pieces.append(event.value)
            finish, stats = event.value
            return shapes.full("".join(pieces), finish, usage(prompt_tokens, stats), timings(stats))
        except BaseException:
            job.cancel()
            raise

    async def stream(events: JobEvents, shapes: Shapes, prompt_tokens: int, include_usage: bool):
        try:
            if shapes.chat:
                yield sse(shapes.chunk(first=True))
            while (event := await events.next()).kind == "text":
                yield sse(shapes.chunk(event.value))
            finish, stats = event.value
            yield sse(shapes.chunk(finish_reason=finish, timings=timings(stats)))
            if include_usage:
                yield sse(shapes.usage_chunk(usage(prompt_tokens, stats)))
            yield sse("[DONE]")
        except ApiError as exc:  # headers are gone: the error travels as a data event
            yield sse(exc.body())
        except ClientGone:  # the job was stopped under us (server shutting down): end the stream
            return
        finally:
            events.job.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        messages = await chat_messages(req)
        return await answer(request, req, True, lambda: engine.chat_ids(messages))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        return await answer(request, req, False, completion_ids(req.prompt))

    return app


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


def serve(args) -> None:
    import uvicorn

    from ..engine.engine import Engine

    loopback = check_host(args.host, args.allow_remote)
    if args.queue_size < 0 or args.timeout <= 0:
        raise LmbundleError("--queue-size must be >= 0 and --timeout > 0")
    options = Options(api_key=args.api_key, timeout=args.timeout, queue_size=args.queue_size,
                      allowed_dirs=resolve_dirs(getattr(args, "allow_files", None) or []),
                      hosts=loopback_hosts(args.port) if loopback else None,
                      prefill_chunk=args.chunk if getattr(args, "prefill", "s1") == "chunked" else 0)
    engine = Engine(args.bundle, backend=args.backend, device=args.device)
    engine.warmup()
    app = create_app(engine, options)
    if not loopback:
        print(f"warning: listening on {args.host}: any machine that can reach this port can use the model"
              + ("" if args.api_key else " (no --api-key set: anyone)"), file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{engine.name} ({engine.backend_name} on {engine.device}): chat page http://{shown}:{args.port}/ , "
          f"OpenAI API http://{shown}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
