"""Constrained decoding: only tokens that keep the output inside a grammar (a JSON schema) can be chosen.

The grammar engine is llguidance (Microsoft's, MIT, Rust with Python bindings; one 3 MB abi3 wheel with
no dependencies). It builds no automaton ahead of time: a token mask is computed per step from an Earley
parser over a lexer (~50 us for a 250k-token vocabulary per its authors), so a new schema per request
costs nothing up front, and recursive schemas work. Chosen over xgrammar (needs apache-tvm-ffi, compiles
each grammar first) and outlines-core (builds a full index per schema: seconds for large schemas, no
recursion).

How it meets the pipelined loop: the engine enqueues step n+1 (fed with token n, still on the device)
before it reads token n. The mask for token n+1 depends on token n, so the engine, when a constraint is
present, still enqueues step n+1 first, then reads token n, advances the matcher with it and computes the
next mask on the host while the device runs step n+1; only the choice of token n+1 (a masked argmax or
draw) waits for the mask. The model's forward pass never waits for the grammar.

A grammar may say which strings end its open pieces soonest (`Grammar.closers`: a tool call's raw text
value ends at "\n</parameter>\n", which no JSON closer can tell); they are tried before JSON's when the
token budget runs out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import LmbundleError

_BITS = None


class GrammarError(LmbundleError):
    """A schema or grammar the engine cannot use (HTTP 400)."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise GrammarError("constrained output needs the llguidance package (pip install llguidance)") from None
    return llguidance


@lru_cache(maxsize=4)
def _tokenizer(hf_tokenizer, vocab: int, stop_ids: tuple[int, ...]):
    """llguidance's view of the tokenizer (built once per engine: about a second for a real vocabulary)."""
    llg = _llguidance()
    return llg.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab, eos_token=list(stop_ids))


@dataclass(frozen=True)
class Grammar:
    """A grammar (llguidance's serialized form) and the strings that end its open pieces soonest, tried in
    order before the JSON closers when the token budget runs out."""

    text: str
    closers: tuple[str, ...] = ()


def json_options(strict: bool = True, separators: tuple[str, str] = (",", ":")) -> dict:
    """llguidance's JSON compile options: no free whitespace, these item and key separators; not `strict`:
    keywords it cannot enforce are ignored (else they are errors)."""
    return {"whitespace_flexible": False, "item_separator": separators[0], "key_separator": separators[1],
            "lenient": not strict}


def json_grammar(schema: dict | None, strict: bool = True) -> str:
    """The grammar of compact JSON text fitting `schema` (None: any JSON object); not `strict`, the keywords
    llguidance cannot enforce are ignored (OpenAI's strict: false), else they are a GrammarError."""
    llg = _llguidance()
    schema = {"type": "object"} if schema is None else schema
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=json_options(strict))
    except Exception as exc:  # noqa: BLE001 - the compiler reports schema problems as plain exceptions
        raise GrammarError(f"unusable JSON schema: {str(exc)[:300]}") from None
    check_grammar(grammar, "unusable JSON schema")
    return grammar


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def check_grammar(grammar: str, what: str = "unusable grammar") -> None:
    """GrammarError naming the first problem llguidance finds in `grammar` (`what`: how to call it)."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"{what}: {' '.join(messages)[:300]}")


# In this order: what closes JSON strings, objects and arrays, a comma (ends a number or a value before a
# required key), then the shortest number (only where a value must start); the stop token before all.
CLOSERS = ('"}', '"', "}", "]", ",", "0")


@lru_cache(maxsize=4)
def _openers(hf_tokenizer, vocab: int) -> torch.Tensor:
    """A token bitmask (int32 words) of the tokens whose text holds '{' or '[' (byte-level token strings
    write these two characters as themselves)."""
    words = torch.zeros((vocab + 31) // 32, dtype=torch.int64)
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(min(len(hf_tokenizer), vocab))))
    for token, piece in enumerate(pieces):
        if piece and ("{" in piece or "[" in piece):
            words[token >> 5] |= 1 << (token & 31)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _token_runs(tokenizer, texts) -> list[tuple[int, ...]]:
    return [tuple(tokenizer.encode(text, add_special_tokens=False)) for text in texts if text]


class GrammarConstraint:
    """A sampling processor (see sampling.Sampling) that masks every token the grammar forbids."""

    needs_host = True

    def __init__(self, grammar: str | Grammar, hf_tokenizer, vocab: int, stop_ids, device: torch.device,
                 budget: int | None = None):
        llg = _llguidance()
        grammar = grammar if isinstance(grammar, Grammar) else Grammar(grammar)
        tokenizer = _tokenizer(hf_tokenizer, vocab, tuple(sorted(stop_ids)))
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar.text, tokenizer)
        if is_error:
            raise GrammarError(f"unusable grammar: {' '.join(messages)[:300]}")
        self.matcher = llg.LLMatcher(tokenizer, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"unusable grammar: {self.matcher.get_error()[:300]}")
        self.vocab = vocab
        self.device = device
        self.words = (vocab + 31) // 32
        self.host_mask = torch.zeros(self.words, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)
        # Closing: when the token budget (max_tokens) is nearly spent, steer to the shortest way out, so
        # that even a model that would ramble (a random one) ends with text the grammar accepts.
        self.budget, self.used = budget, 0
        self.need = 0  # tokens the shortest way out takes from here, as last measured
        self.jump = 0  # the largest growth of `need` seen between two measurements
        own = _token_runs(hf_tokenizer, grammar.closers)
        self.closers = [(t,) for t in stop_ids] + own + _token_runs(hf_tokenizer, CLOSERS)
        self.plan: list[int] = []  # the rest of the closer being steered along
        # a free choice can open a piece (a tool call's optional parameter: its tag, a value, its closer) of
        # about twice the longest closer: the closing starts that much early
        self.jump = 2 * max(map(len, own), default=0)
        self.openers = _openers(hf_tokenizer, vocab) if budget is not None else None

    def accept(self, token: int) -> None:
        self.used += 1
        self.plan = self.plan[1:] if self.plan and self.plan[0] == token else []
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    def _closing(self) -> bool:
        """Whether the budget left is about what the shortest way out needs (measured by walking that way on
        a copy of the matcher: every 4 tokens once fewer than 512 remain, every token near the end)."""
        remaining = self.budget - self.used
        if remaining > 512:
            return False
        if self.used % 4 == 0 or not self.need or remaining <= 2 * (self.need + self.jump) + 16:
            need = self._close_length()  # every token near the end
            if self.need:  # the most one measurement grew: one free choice can open that much more
                self.jump = max(self.jump, need - self.need)
            self.need = need
        return remaining <= self.need + max(8, 2 * self.jump)

    def _close_length(self, limit: int = 512) -> int:
        matcher = self.matcher.deep_copy()
        steps = 0
        while steps < limit:
            if matcher.is_accepting() or matcher.is_stopped() or matcher.is_error():
                return steps + 1  # the stop token
            run = self._closing_run(matcher, np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8))
            if not run:
                return limit
            matcher.consume_tokens(list(run))
            steps += len(run)
        return limit

    def _closing_run(self, matcher, bits: np.ndarray) -> tuple[int, ...]:
        """The shortest way out from `matcher`, whose mask is `bits` (bit t of byte t // 8: token t allowed): a
        closer the grammar takes whole, else what it forces next, else (a choice no closer makes, as between
        enum values) the first token it allows."""
        for run in self.closers:
            first = run[0]
            if (first < self.vocab and (bits[first >> 3] >> (first & 7)) & 1
                    and (len(run) == 1 or matcher.validate_tokens(list(run)) == len(run))):
                return run
        forced = matcher.compute_ff_tokens()
        if forced:
            return tuple(forced)
        set_bytes = np.flatnonzero(bits)
        if not set_bytes.size:
            return ()
        byte = int(set_bytes[0])
        first = byte * 8 + (int(bits[byte]) & -int(bits[byte])).bit_length() - 1
        return (first,) if first < self.vocab else ()

    def _allowed(self, token: int) -> bool:
        return token < self.vocab and bool((int(self.host_mask[token >> 5]) >> (token & 31)) & 1)

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting() or self.matcher.is_stopped()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.matcher.is_error():
            raise LmbundleError(f"grammar: {self.matcher.get_error()[:300]}")
        self.matcher.unsafe_compute_mask_ptr(self.host_mask.data_ptr(), self.words * 4)
        if self.budget is not None and self._closing():
            if not (self.plan and self._allowed(self.plan[0])):
                self.plan = list(self._closing_run(self.matcher, self.host_mask.numpy().view(np.uint8)))
            if self.plan:
                only = torch.full_like(logits, float("-inf"))
                only[self.plan[0]] = 0.0
                return only
        if self.budget is not None and self.budget - self.used <= 2 * self.need + 24:
            # near the end: no token that opens an object or array (each could need more than is left)
            # unless the grammar leaves nothing else
            narrowed = self.host_mask & ~self.openers
            if bool(narrowed.any()):
                self.host_mask.copy_(narrowed)
        words = self.host_mask.to(self.device, non_blocking=True)
        allowed = ((words.unsqueeze(1) >> self.shifts) & 1).view(-1)[: logits.numel()].bool()
        return logits.masked_fill(~allowed, float("-inf"))
