"""OpenAI's wire format, the answer side: the engine's Outputs -> chat / completion bodies and stream chunks.

One assembler (`Reply`) for both: a streamed answer sends the chunks it makes from each batch of Outputs, a
whole answer is the body made from the same deltas at the end. A chat's text goes through the reasoning and
tool-call parser (tools.py); "tool_calls" replaces "stop" as the finish reason when the reply made calls.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

from ..engine.request import Output, Stats
from .tools import OutputParser


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, stats: Stats) -> dict:
    """OpenAI's usage, with the prompt tokens the engine's state already held (a conversation's earlier
    turns) as `prompt_tokens_details.cached_tokens`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def timings(stats: Stats) -> dict:
    """Speed figures (an extension field; the web page shows decode tok/s)."""
    return {"prefill_tok_s": round(stats.prefill_tok_s, 2), "decode_tok_s": round(stats.decode_tok_s, 2),
            "prefill_seconds": round(stats.prefill_seconds, 4), "decode_seconds": round(stats.decode_seconds, 4)}


def logprob_entry(token_bytes: Callable[[int], list[int]], output: Output, as_ids: bool = False) -> dict:
    """OpenAI's per-token logprob object (chat shape); `token` is the token's text (`as_ids`: "token_id:N", as
    vLLM names it, the only exact name in the legacy completions shape), `bytes` its bytes."""
    def one(token: int, value: float) -> dict:
        raw = token_bytes(token)
        name = f"token_id:{token}" if as_ids else bytes(raw).decode("utf-8", errors="replace")
        return {"token": name, "logprob": max(value, -9999.0), "bytes": raw}
    return {**one(output.token, output.logprobs.logprob),
            "top_logprobs": [one(t, v) for t, v in output.logprobs.top]}


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """The legacy completions endpoint's logprobs shape."""
    text_offset, at = [], offset
    for e in entries:
        text_offset.append(at)
        at += len(bytes(e["bytes"]).decode("utf-8", errors="replace"))  # the text's, also for "token_id:N" names
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": text_offset}


class Shapes:
    """Response bodies of one request (one id and creation time for all its chunks)."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def full(self, answer: dict | str, finish_reason: str, usage_: dict, timings_: dict,
             logprobs: dict | None = None) -> dict:
        """`answer`: the chat message's fields (content, reasoning_content, tool_calls) or the completion text."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", **answer},
                      "finish_reason": finish_reason, "logprobs": logprobs}
            return self._envelope("chat.completion", [choice], usage=usage_, timings=timings_)
        choice = {"index": 0, "text": answer, "finish_reason": finish_reason, "logprobs": logprobs}
        return self._envelope("text_completion", [choice], usage=usage_, timings=timings_)

    def chunk(self, delta: dict | str | None = None, finish_reason: str | None = None, first: bool = False,
              logprobs: dict | None = None, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (delta or {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": logprobs}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, usage_: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage_)


class Reply:
    """One request's answer, put together from the engine's Outputs as they come (`add`): the chunks of a
    stream, and at the end (`finished`) the body of a whole answer (`body`) from the same deltas.

    `parser` splits a chat's text into reasoning, content and tool calls (None: a completion's plain text);
    `token_bytes` gives a token's bytes for logprob entries; `with_logprobs`: the request asked for them;
    `token_ids`: the entries name tokens as "token_id:N" (`return_tokens_as_token_ids`)."""

    def __init__(self, shapes: Shapes, prompt_tokens: int, parser: OutputParser | None,
                 token_bytes: Callable[[int], list[int]], with_logprobs: bool, token_ids: bool = False):
        self.shapes, self.prompt_tokens, self.parser = shapes, prompt_tokens, parser
        self.token_bytes, self.with_logprobs, self.token_ids = token_bytes, with_logprobs, token_ids
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] = []
        self.moved: str | None = None  # a reply that never left "thinking": its reasoning is the answer
        self.entries: list[dict] = []  # logprob entries
        self.at = 0  # the legacy endpoint's text offset
        self.finish: str | None = None
        self.stats: Stats | None = None

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def first_chunk(self) -> dict:
        return self.shapes.chunk(first=True)

    def add(self, outputs: list[Output]) -> list[dict]:
        """Take the next Outputs (the last of all has the finish reason); returns the stream chunks they make."""
        text = "".join(o.text for o in outputs)
        entries = [logprob_entry(self.token_bytes, o, self.token_ids) for o in outputs if o.logprobs is not None]
        final = outputs[-1] if outputs and outputs[-1].finish_reason is not None else None
        if self.parser is not None:
            deltas = self.parser.push(text)
            if final is not None:
                deltas += self.parser.finish(final.finish_reason == "stop")
        else:
            deltas = [{"content": text}] if text else []
        chunks = self._chunks(deltas, entries)
        if final is not None:
            self.finish = "tool_calls" if self.tool_calls and final.finish_reason == "stop" else final.finish_reason
            self.stats = final.stats
            chunks.append(self.shapes.chunk(finish_reason=self.finish, timings=timings(self.stats)))
        return chunks

    def _chunks(self, deltas: list[dict], entries: list[dict]) -> list[dict]:
        """Record the deltas for the body; each becomes a chunk (the first carries the logprobs)."""
        self.entries += entries
        out = []
        for delta in deltas:
            if "tool_call" in delta:
                call = delta["tool_call"]
                delta = {"tool_calls": [{"index": len(self.tool_calls), **call}]}
                self.tool_calls.append(call)
            elif delta.get("moved_from_reasoning"):
                self.moved = delta["content"]
                delta = {"content": delta["content"]}
            elif "reasoning_content" in delta:
                self.reasoning.append(delta["reasoning_content"])
            else:
                self.content.append(delta["content"])
            out.append(delta)
        if entries and not out:
            out.append({})
        chunks = []
        for i, delta in enumerate(out):
            logprobs = None
            if self.with_logprobs and i == 0 and entries:
                logprobs = {"content": entries} if self.shapes.chat else completion_logprobs(entries, self.at)
            if not self.shapes.chat:
                delta = delta.get("content", "")
                self.at += len(delta)
            chunks.append(self.shapes.chunk(delta, logprobs=logprobs))
        return chunks

    def usage_chunk(self) -> dict:
        return self.shapes.usage_chunk(usage(self.prompt_tokens, self.stats))

    def error_chunk(self) -> dict:
        """The last chunk of a stream cut by an error (the error event follows it)."""
        return self.shapes.chunk(finish_reason="error")

    def body(self) -> dict:
        """The whole answer, once finished."""
        usage_, timings_ = usage(self.prompt_tokens, self.stats), timings(self.stats)
        if not self.shapes.chat:
            logprobs = completion_logprobs(self.entries) if self.with_logprobs else None
            return self.shapes.full("".join(self.content), self.finish, usage_, timings_, logprobs)
        logprobs = {"content": self.entries} if self.with_logprobs else None
        return self.shapes.full(self.message(), self.finish, usage_, timings_, logprobs)

    def message(self) -> dict:
        if self.moved is not None:  # never "content: null" with the answer hidden in the reasoning
            return {"content": self.moved, "reasoning_content": None}
        content = "".join(self.content)
        message = {"content": content if content or not self.tool_calls else None,
                   "reasoning_content": "".join(self.reasoning) or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message
