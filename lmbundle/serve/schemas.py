"""OpenAI's wire format, the request side: request schemas and the error shape.

What one local model can honour is accepted (see docs/serve.md); a field we would otherwise ignore in a way
that changes the answer (n > 1, echo, suffix) is refused with a 400 that says so.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 8
MAX_JSON_DEPTH = 64  # far past any real request (a JSON schema in response_format or tools included)
MAX_INT_DIGITS = 40  # past any id, seed or count (Python's own limit, 4300 digits, would be a ValueError)


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


def decode_json(raw: bytes) -> object:
    """A request body as JSON, or a 400 naming what is wrong (not JSON, nested past MAX_JSON_DEPTH, an integer
    of more than MAX_INT_DIGITS digits), then `check_json`'s checks."""
    try:
        body = json.loads(raw, parse_int=_bounded_int)
    except ApiError:
        raise
    except RecursionError:
        raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels",
                       code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
    check_json(body)
    return body


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ApiError(400, f"request body holds an integer of {digits} digits (at most {MAX_INT_DIGITS})",
                       code="invalid_json")
    return int(text)


def check_json(body: object) -> None:
    """Refuse what would fail later as a server error: nesting past MAX_JSON_DEPTH (recursive code
    downstream: pydantic, the chat template, the grammar compiler) and strings with lone UTF-16
    surrogates (JSON's "\\ud800" escape decodes to one; no tokenizer or UTF-8 encoder accepts it)."""
    stack = [(body, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels (at {where or 'body'})",
                           code="invalid_json")
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where)
                stack.append((item, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{where or 'body'}: a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) is not "
                       "text; send valid Unicode", code="invalid_value", param=where or None) from None


class _Schema(BaseModel):
    """Strict types, as OpenAI's API takes them: `"stream": "yes"`, `"max_tokens": "10"` or `"temperature": true`
    are refused, not coerced (an integer where a number goes is a number)."""

    model_config = ConfigDict(extra="ignore", strict=True)


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


class ToolCallFunction(_Schema):
    name: str
    arguments: Union[str, dict] = "{}"


class ToolCall(_Schema):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Part], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Schema):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Schema):
    name: str


class NamedToolChoice(_Schema):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Schema):
    name: str = "response"
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class _Sampled(_Schema):
    """Fields shared by both endpoints. top_k, min_p are extensions (as in vLLM and llama.cpp)."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # a signed 64-bit integer: distinct seeds never wrap
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    return_tokens_as_token_ids: bool = False  # vLLM's extension: logprob entries name tokens as "token_id:N"

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def bias(self, vocab: int) -> dict[int, float]:
        """logit_bias as {token id: bias}, checked (OpenAI's range: -100 to 100)."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
            if not 0 <= token < vocab:
                raise ApiError(400, f"logit_bias: token id {token} is not in [0, {vocab})", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: {value} for token {token} is not in [-100, 100]",
                               param="logit_bias")
            out[token] = float(value)
        return out


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict | None = None
    enable_thinking: bool | None = None  # an extension (also accepted inside chat_template_kwargs)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_count(self) -> int | None:
        """None: no logprobs; else how many top alternatives to list per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str], list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_count(self) -> int | None:
        return self.logprobs


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
    if request.n > 1:
        raise ApiError(400, f"n={request.n}: this server returns one choice per request; send {request.n} requests "
                       "(with different seeds) instead", code="unsupported", param="n")
    refused = {"echo": request.echo, "suffix": request.suffix} if isinstance(request, CompletionRequest) else {}
    for name, value in refused.items():
        if value:
            raise ApiError(400, f"{name} is not supported by this server", code="unsupported", param=name)
    return request


def _is_type_tag(part) -> bool:
    """Union branch names pydantic puts into error locations ('str', 'list[...]', 'function-...')."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-") or
                                      part in ("str", "int", "float", "bool", "list", "dict", "none"))
