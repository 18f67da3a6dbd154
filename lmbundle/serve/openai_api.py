"""OpenAI's wire format: request schemas, response and stream-chunk shapes, the error shape.

Only what one local model can honour is accepted; a field we would silently ignore in a way that
changes the answer (n > 1, logprobs, tools, echo) is refused with a 400 instead.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 8


class ApiError(Exception):
    """An answer in OpenAI's error shape with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageUrl(_Schema):
    url: str
    detail: str | None = None


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ImagePart(_Schema):
    type: Literal["image_url"]
    image_url: Union[ImageUrl, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = None


class StreamOptions(_Schema):
    include_usage: bool = False


class _Sampled(_Schema):
    """Fields shared by both endpoints. top_k is an extension (as in vLLM and llama.cpp)."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    logprobs: bool | int | None = None

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str], list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    echo: bool = False
    suffix: str | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(schema: type[_Sampled], body: object) -> _Sampled:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = schema.model_validate(body)
    except ValidationError as exc:
        deepest = max(exc.errors(), key=lambda e: len(e["loc"]))  # within a union: the branch that got furthest
        where = ".".join(str(p) for p in deepest["loc"] if not _is_type_tag(p))
        raise ApiError(400, f"{where or 'body'}: {deepest['msg']}", code="invalid_value", param=where or None) from None
    refused = {"logprobs": request.logprobs, "tools": getattr(request, "tools", None),
               "echo": getattr(request, "echo", False), "suffix": getattr(request, "suffix", None)}
    for name, value in refused.items():
        if value:
            raise ApiError(400, f"{name} is not supported by this server", code="unsupported", param=name)
    return request


def _is_type_tag(part) -> bool:
    """Union branch names pydantic puts into error locations ('str', 'list[...]', 'function-...')."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-") or
                                      part in ("str", "int", "float", "bool", "list", "dict", "none"))


class StopMatcher:
    """Cuts streamed text at the first stop string. Text that could still be the start of a stop
    string is held back until the next piece shows whether it is."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = next((k for k in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1)
                     if any(s.startswith(text[-k:]) for s in self.stops)), 0)
        self.pending = text[len(text) - hold:]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, stats) -> dict:
    """OpenAI's usage, with the prompt tokens the engine's state already held (a conversation's earlier
    turns) as `prompt_tokens_details.cached_tokens`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def timings(stats) -> dict:
    """Speed figures (an extension field; the web page shows decode tok/s)."""
    return {"prefill_tok_s": round(stats.prefill_tok_s, 2), "decode_tok_s": round(stats.decode_tok_s, 2),
            "prefill_seconds": round(stats.prefill_seconds, 4), "decode_seconds": round(stats.decode_seconds, 4)}


class Shapes:
    """Response bodies of one request (one id and creation time for all its chunks)."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def full(self, text: str, finish_reason: str, usage_: dict, timings_: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion", [choice], usage=usage_, timings=timings_)
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice], usage=usage_, timings=timings_)

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False,
              **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, usage_: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage_)
