"""Qwen3.5's output, split the way OpenAI clients read it: `reasoning_content`, `content`, `tool_calls`, the
call's arguments typed by the tool's JSON schema (the grammar that forces a call: tool_grammar.py).

The formats (from Qwen3.5's chat template and the public parsers of vLLM `qwen3` / `qwen3_coder`, SGLang
`Qwen3CoderDetector` and llama.cpp's Qwen3-Coder format; no code taken from them):
- thinking: the generation prompt ends in `<think>\\n` when thinking is on (`<think>\\n\\n</think>\\n\\n` when
  off), so the reply starts with reasoning and `</think>` ends it; a model may also open `<think>` itself
  at the start of its reply (Qwen3 style);
- a tool call is a block `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...
  </function>\\n</tool_call>`, the values raw text (strings unquoted, others as JSON); Qwen3 / Qwen3-VL
  write `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` instead, which is read too.

Failures seen elsewhere and avoided here: a tool call written inside the reasoning is still a tool call
(vLLM #39056); a `<tool_call>` with `</think>` never written ends the reasoning (the tag is omitted when
tools are present); a reply that ends while still "thinking" without ever closing it (small models) is
given back as content, never as `content: null`. A block that cannot be read as a call to a declared
tool is given back as content text; one cut off by the token limit (no `</function>` yet) is dropped, so
no half-written `<tool_call>` ends up in the content.
"""

from __future__ import annotations

import json
import re
import uuid

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


def _held(text: str, tags: list[str]) -> int:
    """How many characters at the end of `text` could be the start of one of `tags`."""
    for k in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-k:]) for tag in tags):
            return k
    return 0


class OutputParser:
    """Streaming split of generated text. `push(text)` and `finish(stopped)` return deltas, each a dict
    with one of "reasoning_content", "content" (text) or "tool_call" (an OpenAI tool call object)."""

    def __init__(self, thinking: bool, tools: list[dict] | None):
        self.mode = "reasoning" if thinking else "content"
        self.tools = {t["function"]["name"]: t["function"] for t in tools or []}
        self.buffer = ""
        self.reasoning = ""  # all reasoning text given out
        self.content_started = False  # leading whitespace of the content is dropped
        self.pending_space = ""  # trailing whitespace of the content, given out once more text follows
        self.think_closed = False
        self.call_in_reasoning = False  # a call interrupted the reasoning: a later </think> is dropped
        self.calls = 0

    def _tags(self) -> list[str]:
        tags = [CALL_OPEN] if self.tools else []
        if self.mode == "reasoning" or (self.call_in_reasoning and not self.think_closed):
            tags.append(THINK_CLOSE)
        elif not self.content_started:
            tags.append(THINK_OPEN)
        return tags

    def push(self, text: str) -> list[dict]:
        self.buffer += text
        out: list[dict] = []
        while True:
            if self.mode == "call":
                end = self.buffer.find(CALL_CLOSE)
                if end < 0:
                    return out
                block, self.buffer = self.buffer[:end], self.buffer[end + len(CALL_CLOSE):]
                out += self._call(block)
                self.mode = "content"
                continue
            tags = self._tags()
            found = [(i, tag) for tag in tags if (i := self.buffer.find(tag)) >= 0]
            if not found:
                keep = _held(self.buffer, tags) if tags else 0
                out += self._text(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            index, tag = min(found)
            if tag == THINK_OPEN and self.buffer[:index].strip():
                out += self._text(self.buffer[: index + len(tag)])  # not at the start: plain text
                self.buffer = self.buffer[index + len(tag):]
                continue
            out += self._text(self.buffer[:index])
            self.buffer = self.buffer[index + len(tag):]
            if tag == THINK_OPEN:
                self.mode = "reasoning"
            elif tag == THINK_CLOSE:
                self.mode, self.think_closed = "content", True
            else:  # a tool call, also one written inside the reasoning
                self.call_in_reasoning |= self.mode == "reasoning"
                self.mode = "call"

    def finish(self, stopped: bool) -> list[dict]:
        """The rest once generation ended (`stopped`: at the model's stop token, not the length limit)."""
        out: list[dict] = []
        if self.mode == "call":  # an unclosed block: a call if it reads as one, else text; cut off, dropped
            block, self.buffer = self.buffer, ""
            if stopped or "</function>" in block:
                out += self._call(block, closed=False)
            self.mode = "content"
        else:
            rest, self.buffer = self.buffer, ""
            out += self._text(rest)
        if (stopped and self.mode == "reasoning" and not self.think_closed and not self.calls
                and not self.content_started and self.reasoning.strip()):
            # the reply ended without ever leaving "thinking": it is the answer, not hidden reasoning
            out.append({"content": self.reasoning.strip(), "moved_from_reasoning": True})
        return out

    # -- pieces ------------------------------------------------------------------------------------
    def _text(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.mode == "reasoning":
            if not self.reasoning:
                text = text.lstrip("\n")
            if not text:
                return []
            self.reasoning += text
            return [{"reasoning_content": text}]
        if not self.content_started:
            text = text.lstrip()
            if not text:
                return []
            self.content_started = True
        text = self.pending_space + text
        body = text.rstrip()
        self.pending_space = text[len(body):]
        return [{"content": body}] if body else []

    def _call(self, block: str, closed: bool = True) -> list[dict]:
        call = self.read_call(block)
        if call is None:
            raw = CALL_OPEN + block + (CALL_CLOSE if closed else "")
            mode, self.mode = self.mode, "content"
            out = self._text(raw)
            self.mode = mode
            return out
        self.calls += 1
        return [{"tool_call": call}]

    def read_call(self, block: str) -> dict | None:
        """A tool call object from the text between <tool_call> and </tool_call>, or None."""
        block = block.strip()
        if block.startswith("{"):
            try:
                data = json.loads(block)
            except json.JSONDecodeError:
                return None
            if not isinstance(data, dict):
                return None
            name, arguments = data.get("name"), data.get("arguments", data.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            if not isinstance(arguments, dict):
                return None
        else:
            match = _FUNCTION.search(block)
            if match is None:
                return None
            name = match.group(1).strip()
            schema = (self.tools.get(name) or {}).get("parameters") or {}
            properties = schema.get("properties") or {}
            arguments = {}
            for param in _PARAMETER.finditer(match.group(2)):
                key = param.group(1).strip()
                arguments[key] = convert_value(_unwrap(param.group(2)), properties.get(key) or {}, schema)
        if not isinstance(name, str) or name not in self.tools:
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _unwrap(value: str) -> str:
    """A parameter's value without the one newline the format puts on each side."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def convert_value(value: str, schema: dict, root: dict | None = None):
    """A raw parameter value as the type its JSON schema declares: JSON of a kind the schema takes (`root`: the
    parameters schema its $refs point into), true / false / none as Python writes them, else the text as
    written (a string)."""
    kinds = schema_kinds(schema, root)
    if kinds is not None and kinds <= {"string"}:
        return value
    text = value.strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = value
    else:
        if kinds is None or _kind(parsed) in kinds:
            return parsed
    lowered = text.lower()
    if kinds is not None and "boolean" in kinds and lowered in ("true", "false"):
        return lowered == "true"
    if kinds is not None and "null" in kinds and lowered in ("null", "none"):
        return None
    return value


JSON_KINDS = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})


def _kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", type(None): "null", list: "array",
            dict: "object"}.get(type(value), "string")


def schema_kinds(schema, root: dict | None = None, depth: int = 0) -> set[str] | None:
    """The JSON types a schema lets a value have (None: any), read from `type`, `enum` / `const`, `anyOf` /
    `oneOf`, `allOf` and local $refs into `root` ("#/$defs/X"); "number" takes integers too."""
    if not isinstance(schema, dict) or depth > 16:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and root is not None:
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _meet(schema_kinds(target, root, depth + 1), schema_kinds({k: v for k, v in schema.items()
                                                                          if k != "$ref"}, root, depth + 1))
    kinds = None
    if "type" in schema:
        declared = schema["type"]
        kinds = {declared} if isinstance(declared, str) else set(declared)
        kinds = (kinds | ({"integer"} if "number" in kinds else set())) & JSON_KINDS
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        kinds = _meet(kinds, {_kind(v) for v in values} if isinstance(values, list) else None)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            branches = [schema_kinds(b, root, depth + 1) for b in schema[key]]
            kinds = _meet(kinds, None if any(b is None for b in branches) else set().union(*branches))
    for branch in schema.get("allOf") or []:
        kinds = _meet(kinds, schema_kinds(branch, root, depth + 1))
    return kinds


def _meet(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return (a | ({"integer"} if "number" in a else set())) & (b | ({"integer"} if "number" in b else set()))
