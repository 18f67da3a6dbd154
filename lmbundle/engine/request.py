"""The engine's face: a `Request` goes in, `Output`s come out (`Engine.generate`).

Everything that uses the engine (the CLI, the Python API, the server's OpenAI protocol, the gates and the
benchmarks) speaks these types: a request says what to generate from (token ids, text, or chat messages
with their images and tools) and how (sampling, stop strings, logprobs, a grammar); each output is one
generated token with the text it completes, and the last one says why generation ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import LmbundleError
from .grammar import Grammar
from .sampling import Sampling

FINISH_REASONS = ("stop", "length")  # a stop token or stop string; the token limit (or the context)


@dataclass(frozen=True)
class Request:
    """What to generate.

    The prompt is either `prompt` (token ids, or text encoded as it is: no template) or `messages` (chat
    messages rendered by the bundle's chat template, with `tools` and `template_kwargs` passed to it; an
    image goes in a message's content as {"type": "image", "image": <path | bytes | PIL image>}).
    `max_tokens` None: up to the context. Generation ends at the bundle's stop tokens (unless `ignore_eos`),
    at the first of the `stop` strings (the text ends before it), or after `max_tokens`.
    `logprobs` k: each output carries its token's log-probability and the k most likely tokens' (0: the
    token's only). `presence_penalty`, `frequency_penalty` and `logit_bias` ({token id: bias}) change the
    logits as OpenAI defines them; `grammar` (llguidance's, or an `engine.grammar.Grammar`) constrains the
    output.
    `prefill_chunk`: how the prompt is fed, None as the engine was set up, 0 as single-token steps, n in
    chunks of n tokens."""

    prompt: str | Sequence[int] | None = None
    messages: Sequence[dict] | None = None
    tools: Sequence[dict] | None = None
    template_kwargs: dict | None = None
    max_tokens: int | None = None
    sampling: Sampling = Sampling()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    grammar: str | Grammar | None = None
    prefill_chunk: int | None = None

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise LmbundleError("a request takes either a prompt or messages")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise LmbundleError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise LmbundleError(f"logprobs must be >= 0, got {self.logprobs}")
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability under the model's own distribution (before penalties, bias, a
    grammar, temperature and filters), and the `top` most likely tokens as (token id, logprob)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # the prompt's prefix that the state already held (a chat's earlier turns)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # until the first generated token is known
    decode_seconds: float = 0.0  # from the first to the last generated token
    stop_reason: str = "length"  # as the tokens ended: a stop token, else the limit

    @property
    def decode_tok_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        fed = self.prompt_tokens - self.cached_tokens
        return fed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclass(frozen=True)
class Output:
    """One generated token and the text it completes ("" while a character or a possible stop string is
    held back), or, last, the end: `finish_reason` set ("stop" or "length"), `token` None, `text` what was
    still held back, `stats` the request's figures."""

    token: int | None
    text: str
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    stats: Stats | None = None


@dataclass
class Completion:
    """A whole answer: its tokens, its text, why it ended, its figures (and logprobs when asked for)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    stats: Stats = field(default_factory=Stats)
    logprobs: list[TokenLogprobs] = field(default_factory=list)

    @classmethod
    def of(cls, outputs) -> Completion:
        done, pieces = cls(), []
        for output in outputs:
            pieces.append(output.text)
            if output.token is not None:
                done.tokens.append(output.token)
            if output.logprobs is not None:
                done.logprobs.append(output.logprobs)
            if output.finish_reason is not None:
                done.finish_reason, done.stats = output.finish_reason, output.stats
        done.text = "".join(pieces)
        return done
