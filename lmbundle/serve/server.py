"""`lmbundle serve`: an OpenAI-compatible HTTP API and a web chat page over one bundle.

Requests are parsed and their images decoded on the event loop's side; the prompt is built and
decoded on the single worker thread (worker.py). Errors leave in OpenAI's error shape, with 4xx for
what the client can fix. The server listens on loopback unless the operator explicitly opts in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import os
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

from ..engine.grammar import GrammarError, json_grammar, lark_grammar
from ..engine.request import Request as EngineRequest
from ..engine.sampling import Sampling
from ..errors import ContextTooLong, LmbundleError, TemplateError
from .images import ImageError, check_header, decode_bytes, give_back_memory, image_bytes, resolve_dirs
from .metrics import Metrics
from .metrics import health as health_report
from .openai_api import (
    MAX_JSON_DEPTH,
    ApiError,
    ChatRequest,
    CompletionRequest,
    ImagePart,
    Shapes,
    check_json,
    parse,
    timings,
    usage,
)
from .tools import OutputParser
from .worker import Job, QueueFull, Worker

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MB image as base64 plus the conversation
RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tools", "documents", "chat_template", "tokenize", "padding",
                            "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                            "add_generation_prompt", "continue_final_message", "tokenizer_kwargs"}
PUBLIC_PATHS = ("/", "/favicon.ico")  # the page itself; it asks for the key when the API answers 401


@dataclass
class Options:
    api_key: str | None = None
    timeout: float = 300.0
    queue_size: int = 16
    allowed_dirs: list[Path] = field(default_factory=list)
    hosts: set[str] | None = None  # accepted Host headers; None accepts any
    prefill_chunk: int = 0  # 0: the prompt as S=1 steps (--prefill s1)
    max_batch: int = 1  # requests decoded at once (--max-batch)


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


def run_generation(engine, request: EngineRequest, job: Job) -> None:
    """Worker side: build the prompt, decode, stream text out (the engine decides where it ends).
    Events: ("prompt", (prompt tokens, whether the reply starts inside <think>)), ("text", (text,
    [logprob entries])) ..., ("done", (finish reason, stats))."""
    prompt = engine.prompt(request)
    thinking = request.messages is not None and prompt.opens_thinking and request.grammar is None
    job.emit("prompt", (len(prompt.ids), thinking))
    outputs = engine.generate(request, prompt)
    entries = []
    try:
        for output in outputs:
            job.check()
            if output.logprobs is not None:
                entries.append(logprob_entry(engine, output.token, output.logprobs))
            if output.text or entries:
                job.emit("text", (output.text, entries))
                entries = []
            if output.finish_reason is not None:
                job.emit("done", (output.finish_reason, output.stats))
    finally:
        outputs.close()


def logprob_entry(engine, token: int, logprobs) -> dict:
    """OpenAI's per-token logprob object (chat shape); `token` is the token's text, `bytes` its bytes."""
    def one(tid: int, value: float) -> dict:
        raw = engine.token_bytes(tid)
        return {"token": bytes(raw).decode("utf-8", errors="replace"), "logprob": max(value, -9999.0),
                "bytes": raw}
    return {**one(token, logprobs.logprob), "top_logprobs": [one(t, v) for t, v in logprobs.top]}


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """The legacy completions endpoint's logprobs shape."""
    text_offset, at = [], offset
    for e in entries:
        text_offset.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": text_offset}


class Reply:
    """A non-streamed reply put together from the parser's deltas."""

    def __init__(self):
        self.content, self.reasoning, self.tool_calls, self.moved = [], [], [], None

    def add(self, deltas: list[dict]) -> None:
        for delta in deltas:
            if "tool_call" in delta:
                self.tool_calls.append(delta["tool_call"])
            elif delta.get("moved_from_reasoning"):
                self.moved = delta["content"]
            elif "reasoning_content" in delta:
                self.reasoning.append(delta["reasoning_content"])
            else:
                self.content.append(delta["content"])

    def text(self) -> str:
        return "".join(self.content)

    def message(self) -> dict:
        if self.moved is not None:  # never "content: null" with the answer hidden in the reasoning
            return {"content": self.moved, "reasoning_content": None}
        content = "".join(self.content)
        message = {"content": content if content or not self.tool_calls else None,
                   "reasoning_content": "".join(self.reasoning) or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def chat_message(index: int, message, prepared: dict) -> dict:
    """One request message as the chat template takes it: developer -> system, text parts joined,
    images as prepared encoder inputs, tool call arguments as mappings (Qwen's templates iterate them)."""
    role = "system" if message.role == "developer" else message.role
    out: dict = {"role": role}
    if isinstance(message.content, list):
        parts = [{"type": "image", "image": prepared[id(p)]} if isinstance(p, ImagePart) else
                 {"type": "text", "text": p.text} for p in message.content]
        if not any(p["type"] == "image" for p in parts):  # plain text renders with every template
            parts = "\n".join(p["text"] for p in parts)
        out["content"] = parts
    else:
        out["content"] = message.content or ""
    if message.reasoning_content:
        out["reasoning_content"] = message.reasoning_content
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for k, call in enumerate(message.tool_calls):
            arguments = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments or "{}")
                except json.JSONDecodeError:
                    raise ApiError(400, f"messages[{index}].tool_calls[{k}].function.arguments is not JSON",
                                   param="messages") from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def tool_call_grammar(tools: list[dict]) -> str:
    """A Lark grammar for one Qwen3.5 tool call to one of `tools` (tool_choice "required" or a named
    function): `<tool_call>\\n<function=NAME>\\n` then declared parameters, each
    `<parameter=ARG>\\nVALUE\\n</parameter>\\n`, values typed by the schema (strings raw, one line,
    without '<')."""
    alternatives = []
    for k, tool in enumerate(tools):
        function = tool["function"]
        props = ((function.get("parameters") or {}).get("properties") or {})
        required = list((function.get("parameters") or {}).get("required") or [])
        params = []
        for name in required + [p for p in props if p not in required]:
            kind = (props.get(name) or {}).get("type")
            value = {"string": "STR", "integer": "INT", "number": "NUM", "boolean": "BOOL"}.get(kind, "JSONV")
            piece = f'"<parameter={_lark_text(name)}>\\n" {value} "\\n</parameter>\\n"'
            params.append(piece if name in required else f"({piece})?")
        alternatives.append(f'"<function={_lark_text(function["name"])}>\\n" {" ".join(params)} "</function>\\n"')
    return lark_grammar("\n".join([
        'start: "<tool_call>\\n" call "</tool_call>"',
        "call: " + " | ".join(f"call{k}" for k in range(len(alternatives))),
        *[f"call{k}: {alt}" for k, alt in enumerate(alternatives)],
        "STR: /[^<\\n]{1,2000}/",
        "JSONV: /[-0-9a-z\\[\\]{}\",.: ]{1,2000}/",
        "INT: /-?[0-9]{1,18}/",
        "NUM: /-?[0-9]{1,18}(\\.[0-9]{1,18})?/",
        'BOOL: "true" | "false"',
    ]))


def _lark_text(text: str) -> str:
    return json.dumps(text)[1:-1]


def as_api_error(exc: BaseException) -> ApiError:
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
        if self.key and not public and not self.authorized(headers.get(b"authorization", b"")):
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


def default_sampling(engine) -> dict:
    """The checkpoint's recommended sampling (generation_config.json), else OpenAI's defaults."""
    path = Path(engine.bundle.tokenizer_path) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    sampled = config.get("do_sample", True)
    return {"temperature": float(config.get("temperature", 1.0)) if sampled else 0.0,
            "top_p": float(config.get("top_p", 1.0)), "top_k": int(config.get("top_k", 0) or 0)}


def create_app(engine, options: Options) -> FastAPI:
    worker = Worker(options.queue_size, options.max_batch)
    metrics = Metrics(engine, worker)
    defaults = default_sampling(engine)
    vision = bool(getattr(engine, "is_vlm", False))
    image_slot = asyncio.Semaphore(1)  # one image decoded at a time, server-wide
    vocab_size = engine.bundle.info["config"]["vocab_size"]
    template = engine.tokenizer.chat_template or ""
    template = template if isinstance(template, str) else json.dumps(template)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()
        if hasattr(engine, "close"):
            engine.close()

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
        error = as_api_error(exc)  # a client's mistake found late (a template's refusal) keeps its 4xx
        return JSONResponse(error.body(), status_code=error.status)

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
        return health_report(engine, worker)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/api/info")
    async def info():
        return {**model_card(), "defaults": defaults}

    async def read_body(request: Request, schema):
        limit_error = ApiError(413, f"request body over {MAX_BODY_BYTES // 2**20} MB", code="body_too_large")
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if declared > MAX_BODY_BYTES:
            raise limit_error
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no Content-Length: stop at the limit
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise limit_error
            chunks.append(chunk)
        raw = b"".join(chunks)
        del chunks
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels",
                           code="invalid_json") from None
        check_json(body)
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
                        seed=req.seed, min_p=req.min_p or 0.0)

    def engine_request(req, **prompt) -> EngineRequest:
        """The engine's request for an OpenAI one (`prompt`: its prompt, messages, tools...)."""
        return EngineRequest(**prompt, max_tokens=req.token_limit, sampling=sampling_of(req), stop=req.stop_strings,
                             logprobs=req.top_count, presence_penalty=req.presence_penalty or 0.0,
                             frequency_penalty=req.frequency_penalty or 0.0, logit_bias=req.bias(vocab_size))

    async def chat_messages(req: ChatRequest) -> list[dict]:
        """The request's messages for the template, images decoded. Everything that can refuse a request
        (vision at all, the image count, each image's bytes and declared pixel size) is checked before
        any image is decoded; then one image at a time (server-wide) is decoded and reduced to the
        encoder's input, so at most one full-size image is in memory."""
        found = [(i, part) for i, message in enumerate(req.messages) if isinstance(message.content, list)
                 for part in message.content if isinstance(part, ImagePart)]
        if found and not vision:
            raise ApiError(400, f"this bundle has no vision encoder: {engine.name} takes text only",
                           code="invalid_image", param="messages")
        if found and len(found) > engine.vision.info.max_images:
            raise ApiError(400, f"{len(found)} images in one request; this bundle takes at most "
                           f"{engine.vision.info.max_images}", code="invalid_image", param="messages")
        sources = {}
        try:
            for i, part in found:
                data, name = image_bytes(part.url, options.allowed_dirs)
                check_header(data, name)
                sources[id(part)] = (i, data, name)
        except ImageError as exc:
            raise ApiError(400, f"messages[{i}]: {exc}", code="invalid_image", param="messages") from None
        prepared = {}
        for key, (i, data, name) in sources.items():
            try:
                async with image_slot:
                    prepared[key] = await run_in_threadpool(prepare_image, data, name)
            except ImageError as exc:
                raise ApiError(400, f"messages[{i}]: {exc}", code="invalid_image", param="messages") from None
        sources.clear()
        return [chat_message(i, message, prepared) for i, message in enumerate(req.messages)]

    def prepare_image(data: bytes, name: str):
        image = decode_bytes(data, name)
        try:
            return engine.vision.prepare(image)
        except LmbundleError as exc:
            raise ImageError(str(exc)) from None
        finally:
            image.close()
            del image
            give_back_memory()

    def completion_prompt(prompt) -> str | list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = len(engine.tokenizer)
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "exactly one prompt per request", param="prompt")
            prompt = prompt[0]
        return prompt

    async def answer(request: Request, req, chat: bool, work: EngineRequest, tools: list[dict] | None = None):
        try:
            job = worker.submit(lambda j: run_generation(engine, work, j), options.timeout)
        except QueueFull:
            if worker.closing:
                raise ApiError(503, "the server is shutting down", code="server_shutdown") from None
            raise ApiError(429, "server busy: the request queue is full, retry later", code="queue_full") from None
        shapes = Shapes(chat, engine.name)
        events = JobEvents(job, request, options.timeout, watch=True, closing=lambda: worker.closing)
        try:
            prompt_tokens, thinking = (await events.next()).value
            parser = OutputParser(thinking, tools) if chat else None
            with_logprobs = req.top_count is not None
            if req.stream:
                events.watch = False
                return StreamingResponse(stream(events, shapes, prompt_tokens, req.include_usage, parser,
                                                with_logprobs),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            reply = Reply()
            entries = []
            while (event := await events.next()).kind == "text":
                text, got = event.value
                entries += got
                reply.add(parser.push(text) if parser else [{"content": text}])
            finish, stats = event.value
            if parser:
                reply.add(parser.finish(finish == "stop"))
            finish = "tool_calls" if reply.tool_calls and finish == "stop" else finish
            if chat:
                logprobs = {"content": entries} if with_logprobs else None
                return shapes.full(reply.message(), finish, usage(prompt_tokens, stats), timings(stats), logprobs)
            logprobs = completion_logprobs(entries) if with_logprobs else None
            return shapes.full(reply.text(), finish, usage(prompt_tokens, stats), timings(stats), logprobs)
        except BaseException:
            job.cancel()
            raise

    async def stream(events: JobEvents, shapes: Shapes, prompt_tokens: int, include_usage: bool,
                     parser: OutputParser | None, with_logprobs: bool):
        calls = 0
        at = 0  # the legacy endpoint's text offset

        def chunks(deltas: list[dict], entries: list[dict]):
            nonlocal calls, at
            out = []
            for delta in deltas:
                if "tool_call" in delta:
                    call = delta["tool_call"]
                    delta = {"tool_calls": [{"index": calls, **call}]}
                    calls += 1
                elif shapes.chat:
                    delta = {k: v for k, v in delta.items() if k != "moved_from_reasoning"}
                out.append(delta)
            if entries and not out:
                out.append({} if shapes.chat else "")
            for i, delta in enumerate(out):
                logprobs = None
                if with_logprobs and i == 0 and entries:
                    logprobs = {"content": entries} if shapes.chat else completion_logprobs(entries, at)
                if not shapes.chat:
                    delta = delta.get("content", "") if isinstance(delta, dict) else delta
                    at += len(delta)
                yield sse(shapes.chunk(delta, logprobs=logprobs))

        try:
            if shapes.chat:
                yield sse(shapes.chunk(first=True))
            while (event := await events.next()).kind == "text":
                text, entries = event.value
                for chunk in chunks(parser.push(text) if parser else [{"content": text}], entries):
                    yield chunk
            finish, stats = event.value
            if parser:
                for chunk in chunks(parser.finish(finish == "stop"), []):
                    yield chunk
            finish = "tool_calls" if calls and finish == "stop" else finish
            yield sse(shapes.chunk(finish_reason=finish, timings=timings(stats)))
            if include_usage:
                yield sse(shapes.usage_chunk(usage(prompt_tokens, stats)))
            yield sse("[DONE]")
        except ApiError as exc:  # headers are gone: a last chunk says the answer ended, then the error itself
            yield sse(shapes.chunk(finish_reason="error"))
            yield sse(exc.body())
        except ClientGone:
            return
        finally:
            events.job.cancel()

    def chat_plan(req: ChatRequest):
        """The template's inputs (tools, template kwargs) and the constraint for a chat request."""
        kwargs = dict(req.chat_template_kwargs or {})
        if reserved := sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS):
            raise ApiError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}", param="chat_template_kwargs")
        if req.enable_thinking is not None:
            kwargs.setdefault("enable_thinking", req.enable_thinking)
        choice = req.tool_choice or "auto"
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        if tools and choice != "none" and "tools" not in template:
            raise ApiError(400, f"{engine.name}'s chat template does not take tools", code="unsupported",
                           param="tools")
        if not isinstance(choice, str) and choice.function.name not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        if choice == "required" and not tools:
            raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice")
        grammar = None
        if choice == "required" or not isinstance(choice, str):
            names = [t["function"]["name"] for t in tools] if choice == "required" else [choice.function.name]
            grammar = functools.partial(tool_call_grammar, [t for t in tools if t["function"]["name"] in names])
            kwargs.setdefault("enable_thinking", False)  # the constraint starts at the first token
        form = req.response_format
        if form is not None and form.type != "text":
            if grammar is not None:
                raise ApiError(400, "response_format and a forced tool call cannot be combined",
                               param="response_format")
            if form.type == "json_schema":
                if form.json_schema is None or form.json_schema.schema_ is None:
                    raise ApiError(400, "response_format json_schema needs json_schema.schema",
                                   param="response_format")
                schema = form.json_schema.schema_
            else:
                schema = None
            grammar = functools.partial(json_grammar, schema)
            kwargs.setdefault("enable_thinking", False)  # JSON from the first token
        if grammar is not None:
            try:  # compiled here so a bad schema is a 400 before anything is queued
                grammar = grammar()
            except GrammarError as exc:
                raise ApiError(400, str(exc), code="invalid_response_format", param="response_format") from None
        parse_tools = tools if choice != "none" else None
        return (tools if choice != "none" else None), kwargs, parse_tools, grammar

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        template_tools, kwargs, parse_tools, grammar = chat_plan(req)
        messages = await chat_messages(req)
        work = engine_request(req, messages=messages, tools=template_tools, template_kwargs=kwargs, grammar=grammar)
        return await answer(request, req, True, work, tools=parse_tools)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        return await answer(request, req, False, engine_request(req, prompt=completion_prompt(req.prompt)))

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
    from ..engine.prefix_cache import parse_size
    from ..engine.torch_backend import CudaOptions

    loopback = check_host(args.host, args.allow_remote)
    if args.queue_size < 0 or args.timeout <= 0 or args.max_batch < 1:
        raise LmbundleError("--queue-size must be >= 0, --max-batch >= 1 and --timeout > 0")
    try:
        cache_bytes = parse_size(args.cache_mem)
        host_bytes = None if args.cache_host_mem is None else parse_size(args.cache_host_mem)
    except ValueError as exc:
        raise LmbundleError(f"--cache-mem / --cache-host-mem: {exc}") from None
    api_key = args.api_key or os.environ.get("LMBUNDLE_API_KEY") or None  # the variable stays out of `ps`
    options = Options(api_key=api_key, timeout=args.timeout, queue_size=args.queue_size,
                      allowed_dirs=resolve_dirs(getattr(args, "allow_files", None) or []),
                      hosts=loopback_hosts(args.port) if loopback else None,
                      prefill_chunk=args.chunk if getattr(args, "prefill", "s1") == "chunked" else 0,
                      max_batch=args.max_batch)
    engine = Engine(args.bundle, backend=args.backend, device=args.device, cache_bytes=cache_bytes,
                    cache_host_bytes=host_bytes, cache_block=args.chunk, max_batch=args.max_batch,
                    token_budget=getattr(args, "token_budget", 512), prefill_chunk=options.prefill_chunk,
                    cuda=CudaOptions(prompt_copies=not getattr(args, "no_prompt_copies", False)))
    engine.warmup()
    if args.max_batch > 1:
        # the request threads wake once per token each: at Python's default 5 ms thread switch interval the
        # batch loop waits that long for the GIL after every step (6 ms steps at one row on the H200), so
        # this process switches every 0.2 ms
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
    app = create_app(engine, options)
    if not loopback:
        print(f"warning: listening on {args.host}: any machine that can reach this port can use the model"
              + ("" if api_key else " (no API key set: anyone)"), file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{engine.name} ({engine.backend_name} on {engine.device}): chat page http://{shown}:{args.port}/ , "
          f"OpenAI API http://{shown}:{args.port}/v1", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM / SIGINT: stop the decode first, so every stream still open ends with a last chunk
            # (finish_reason "error") and an error event instead of being cut when the connections close
            app.state.worker.stop_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    Server(config).run()
