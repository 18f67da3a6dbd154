"""OpenAI's requests -> the engine's `Request`: sampling (the checkpoint's defaults where a field is absent),
stops, logprobs, penalties, the chat template's inputs, images, and the grammar of a forced tool call or a
response format. Everything a client can get wrong is refused here with an ApiError, before the request
is queued; the engine's own refusals come back as its errors (app.py maps them)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from ..engine.engine import Engine
from ..engine.grammar import Grammar, GrammarError, json_grammar
from ..engine.request import Request
from ..engine.sampling import Sampling
from ..errors import LmbundleError
from .images import ImageError, check_header, decode_bytes, give_back_memory, image_bytes
from .schemas import ApiError, ChatRequest, CompletionRequest, ImagePart
from .tool_grammar import forced_call_grammar, uses_xml_calls

RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tools", "documents", "chat_template", "tokenize", "padding",
                            "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                            "add_generation_prompt", "continue_final_message", "tokenizer_kwargs"}


@dataclass
class ChatPlan:
    """What a chat request gives the template and the constraint: tools for the template, the template's
    kwargs, the tools the reply is parsed for (None: tool calls stay text), and the grammar."""

    template_tools: list[dict] | None
    template_kwargs: dict
    parse_tools: list[dict] | None
    grammar: Grammar | str | None


class Protocol:
    """The OpenAI protocol over one engine: `chat` and `completion` turn a validated request into the
    engine's Request. Images are decoded one at a time server-wide (`image_slot`), from data URLs or, when
    allowed, files inside `allowed_dirs`."""

    def __init__(self, engine: Engine, allowed_dirs: list[Path]):
        self.engine = engine
        self.allowed_dirs = allowed_dirs
        self.defaults = engine.sampling_defaults()
        self.image_slot = asyncio.Semaphore(1)

    async def chat(self, req: ChatRequest) -> tuple[Request, list[dict] | None]:
        """The engine's request for a chat, and the tools its reply is parsed for."""
        plan = self.chat_plan(req)
        messages = await self.chat_messages(req)
        return self.request(req, messages=messages, tools=plan.template_tools, template_kwargs=plan.template_kwargs,
                            grammar=plan.grammar), plan.parse_tools

    def completion(self, req: CompletionRequest) -> Request:
        return self.request(req, prompt=self.completion_prompt(req.prompt))

    def request(self, req, **prompt) -> Request:
        """The engine's request for an OpenAI one (`prompt`: its prompt, or messages, tools...)."""
        given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
        sampling = Sampling(**{key: self.defaults[key] if value is None else value for key, value in given.items()},
                            seed=req.seed, min_p=req.min_p or 0.0)
        return Request(**prompt, max_tokens=req.token_limit, sampling=sampling, stop=req.stop_strings,
                       logprobs=req.top_count, presence_penalty=req.presence_penalty or 0.0,
                       frequency_penalty=req.frequency_penalty or 0.0, logit_bias=req.bias(self.engine.vocab_size))

    def completion_prompt(self, prompt) -> str | list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            known = self.engine.tokenizer_size
            if not all(0 <= t < known for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {known})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "exactly one prompt per request", param="prompt")
            prompt = prompt[0]
        return prompt

    def chat_plan(self, req: ChatRequest) -> ChatPlan:
        """The template's inputs (tools, template kwargs) and the constraint for a chat request; the grammar
        is compiled here, so a bad schema is a 400 before anything is queued."""
        kwargs = dict(req.chat_template_kwargs or {})
        if reserved := sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS):
            raise ApiError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}", param="chat_template_kwargs")
        if req.enable_thinking is not None:
            kwargs.setdefault("enable_thinking", req.enable_thinking)
        choice = req.tool_choice or "auto"
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        if tools and choice != "none" and "tools" not in self.engine.chat_template:
            raise ApiError(400, f"{self.engine.name}'s chat template does not take tools", code="unsupported",
                           param="tools")
        if not isinstance(choice, str) and choice.function.name not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        if choice == "required" and not tools:
            raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice")
        compile_grammar = None
        if choice == "required" or not isinstance(choice, str):
            names = [t["function"]["name"] for t in tools] if choice == "required" else [choice.function.name]
            forced = [t for t in tools if t["function"]["name"] in names]
            compile_grammar = lambda: forced_call_grammar(forced, uses_xml_calls(self.engine.chat_template))  # noqa: E731
            kwargs.setdefault("enable_thinking", False)  # the constraint starts at the first token
        form = req.response_format
        if form is not None and form.type != "text":
            if compile_grammar is not None:
                raise ApiError(400, "response_format and a forced tool call cannot be combined",
                               param="response_format")
            schema = None
            if form.type == "json_schema":
                if form.json_schema is None or form.json_schema.schema_ is None:
                    raise ApiError(400, "response_format json_schema needs json_schema.schema",
                                   param="response_format")
                schema = form.json_schema.schema_
            strict = bool(form.json_schema and form.json_schema.strict)
            compile_grammar = lambda: json_grammar(schema, strict)  # noqa: E731
            kwargs.setdefault("enable_thinking", False)  # JSON from the first token
        grammar = None
        if compile_grammar is not None:
            try:
                grammar = compile_grammar()
            except GrammarError as exc:
                param = "tools" if form is None or form.type == "text" else "response_format"
                code = "invalid_tools" if param == "tools" else "invalid_response_format"
                raise ApiError(400, str(exc), code=code, param=param) from None
        in_use = tools if choice != "none" else None
        return ChatPlan(in_use, kwargs, in_use, grammar)

    async def chat_messages(self, req: ChatRequest) -> list[dict]:
        """The request's messages for the template, images decoded. Everything that can refuse a request
        (vision at all, the image count, each image's bytes and declared pixel size) is checked before
        any image is decoded; then one image at a time (server-wide) is decoded and reduced to the
        encoder's input, so at most one full-size image is in memory."""
        engine = self.engine
        found = [(i, part) for i, message in enumerate(req.messages) if isinstance(message.content, list)
                 for part in message.content if isinstance(part, ImagePart)]
        if found and not engine.is_vlm:
            raise ApiError(400, f"this bundle has no vision encoder: {engine.name} takes text only",
                           code="invalid_image", param="messages")
        if found and len(found) > engine.vision.info.max_images:
            raise ApiError(400, f"{len(found)} images in one request; this bundle takes at most "
                           f"{engine.vision.info.max_images}", code="invalid_image", param="messages")
        sources = {}
        try:
            for i, part in found:
                data, name = image_bytes(part.url, self.allowed_dirs)
                check_header(data, name)
                sources[id(part)] = (i, data, name)
        except ImageError as exc:
            raise ApiError(400, f"messages[{i}]: {exc}", code="invalid_image", param="messages") from None
        prepared = {}
        for key, (i, data, name) in sources.items():
            try:
                async with self.image_slot:
                    prepared[key] = await run_in_threadpool(self.prepare_image, data, name)
            except ImageError as exc:
                raise ApiError(400, f"messages[{i}]: {exc}", code="invalid_image", param="messages") from None
        sources.clear()
        return [chat_message(i, message, prepared) for i, message in enumerate(req.messages)]

    def prepare_image(self, data: bytes, name: str):
        image = decode_bytes(data, name)
        try:
            return self.engine.vision.prepare(image)
        except LmbundleError as exc:
            raise ImageError(str(exc)) from None
        finally:
            image.close()
            del image
            give_back_memory()


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
