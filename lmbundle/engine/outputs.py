"""Where a request's generation ends and how its tokens become text: the one place for both.

Token by token (`TokenStops`, on whichever thread reads the tokens back, so a batch slot is freed at once):
a stop token ends it ("stop"), so does the token limit ("length"). Text by text (`OutputStream`, on the
request's own thread): tokens are detokenized incrementally and the text is cut at the first stop string
("stop"); text that could still begin a stop string, or a character still missing bytes, is held back
until the next token shows what it is. This is the split vLLM makes between its scheduler's stop check
and its detokenizer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from .request import Output, Stats, TokenLogprobs


@dataclass(frozen=True)
class TokenStops:
    """The token-level end of a request: its stop token ids and its token limit."""

    stop_ids: frozenset[int]
    limit: int

    def finish(self, token: int, generated: int) -> str | None:
        """Why generation ends at `token`, after `generated` tokens kept before it (None: it goes on). A
        stop token is not kept; the token that reaches the limit is."""
        if token in self.stop_ids:
            return "stop"
        return "length" if generated + 1 >= self.limit else None


class StreamDecoder:
    """Incremental detokenization: O(1) work per token, no re-decoding of the whole sequence, and no
    half characters (a multi-byte character split over tokens is held back until complete)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window that is re-decoded for context
        self.emitted = 0  # end of the text already returned, within the window
        # the Rust tokenizer's own decode where it gives the same text (no clean-up of spaces): a third of
        # the time of transformers' decode, which a server runs twice per token per request
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self._decode = functools.partial(backend.decode, skip_special_tokens=True)
        else:
            self._decode = functools.partial(tokenizer.decode, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") and len(self.ids) - self.prefix <= 8:
            return ""  # maybe a character cut between tokens; past 4 more bytes it never completes: shown as is
        new = text[self.emitted :]
        self.prefix = max(self.prefix, len(self.ids) - 4)
        self.emitted = len(self._decode(self.ids[self.prefix :]))
        return new

    def flush(self) -> str:
        """What is still held back at the end (bytes that never completed a character show as U+FFFD)."""
        text = self._decode(self.ids[self.prefix :])
        tail, self.emitted = text[self.emitted :], len(text)
        return tail


class StopStrings:
    """Cuts streamed text at the first stop string. Text that could still be the start of a stop
    string is held back until the next piece shows whether it is."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
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


class OutputStream:
    """A request's tokens -> its Outputs: text pieces, cut at a stop string; then the last Output."""

    def __init__(self, tokenizer, stops: Iterable[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopStrings(stops)
        self.stopped = False  # a stop string was reached: nothing more is generated

    def push(self, token: int, logprobs: TokenLogprobs | None = None) -> Output:
        text, self.stopped = self.stops.push(self.decoder.push(token))
        return Output(token, text, logprobs)

    def finish(self, stats: Stats) -> Output:
        """The last Output: what was held back (none after a stop string) and why generation ended."""
        if self.stopped:
            return Output(None, "", finish_reason="stop", stats=stats)
        text, hit = self.stops.push(self.decoder.flush())
        if not hit:
            text += self.stops.flush()
        return Output(None, text, finish_reason="stop" if hit else stats.stop_reason, stats=stats)


# GPT-2 byte-level BPE: the printable character that stands for each byte in token strings
_PRINTABLE = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)}
_BYTE_OF = {chr(b): b for b in _PRINTABLE} | {
    chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in _PRINTABLE)}


def token_bytes(tokenizer, token: int) -> list[int]:
    """The bytes a token stands for (a byte-level token can be part of a character)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str) and all(c in _BYTE_OF for c in piece):
        return [_BYTE_OF[c] for c in piece]
    return list(tokenizer.decode([token]).encode("utf-8"))
