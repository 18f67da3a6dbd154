"""The token ids behind a server's logprob entries.

Servers name the tokens they return differently: llama-server gives each entry's `id`; vLLM gives
`token_id:N` strings when asked (`return_tokens_as_token_ids`); OpenAI's chat shape (ours, SGLang) gives the
token's `bytes`; the legacy completions shape gives only the decoded text, where a token that ends inside a
UTF-8 character reads as U+FFFD. Ids come from the first of these a server offers; lossy strings are resolved
against the whole completion's text (the tokens' bytes, joined, must spell it). A token that cannot be
resolved stays None: the gate checks a rollout only up to its first unresolved token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers.convert_slow_tokenizer import bytes_to_unicode

REPLACEMENT = "\ufffd"
_TOKEN_ID = re.compile(r"token_id:(\d+)")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Entry:
    """One returned token: what the server said about it, and its id once resolved."""

    token: str
    logprob: float
    raw: bytes | None = None
    id: int | None = None
    top: list["Entry"] = field(default_factory=list)


def entries(logprobs: dict | None) -> list[Entry]:
    """The per-token entries of a choice's `logprobs`, chat shape (`content`) or the legacy completions
    shape (`tokens`, `token_logprobs`, `top_logprobs` as {text: logprob})."""
    if not logprobs:
        return []
    if logprobs.get("content") is not None:
        return [_entry(e, [_entry(t, []) for t in e.get("top_logprobs") or []]) for e in logprobs["content"]]
    out = []
    for k, (token, logprob) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [])):
        tops = (logprobs.get("top_logprobs") or [])
        top = tops[k] if k < len(tops) and tops[k] else {}
        value = float(logprob) if logprob is not None else float("nan")
        out.append(Entry(token, value, top=[Entry(t, float(v)) for t, v in top.items()]))
    return out


def _entry(raw: dict, top: list[Entry]) -> Entry:
    data = raw.get("bytes")
    token_id = raw.get("id", raw.get("token_id"))
    value = raw.get("logprob")
    return Entry(raw.get("token") or "", float(value) if value is not None else float("nan"),
                 bytes(data) if isinstance(data, list) else None,
                 token_id if isinstance(token_id, int) else None, top)


class TokenTable:
    """Every id's bytes under a tokenizer, and the reverse maps a server's entries are resolved with."""

    def __init__(self, tokenizer):
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        byte_level = type(getattr(tokenizer.backend_tokenizer, "decoder", None)).__name__ == "ByteLevel" \
            if hasattr(tokenizer, "backend_tokenizer") else False
        self.bytes: list[bytes] = []
        for i, piece in enumerate(pieces):
            if i in added:
                self.bytes.append(added[i].encode())
            elif byte_level and piece and all(c in byte_of for c in piece):
                self.bytes.append(bytes(byte_of[c] for c in piece))
            elif piece and (match := _BYTE_PIECE.fullmatch(piece)):
                self.bytes.append(bytes([int(match.group(1), 16)]))
            else:
                self.bytes.append((piece or "").replace("\u2581", " ").encode())
        self.by_bytes: dict[bytes, list[int]] = {}
        self.by_text: dict[str, list[int]] = {}
        for i, data in enumerate(self.bytes):
            self.by_bytes.setdefault(data, []).append(i)
            self.by_text.setdefault(data.decode("utf-8", errors="replace"), []).append(i)
        self.added = set(added)

    def candidates(self, entry: Entry) -> list[int]:
        """The ids `entry` can be, best first (one id where the server said enough)."""
        named = entry.id if entry.id is not None else (
            int(match.group(1)) if (match := _TOKEN_ID.fullmatch(entry.token)) else None)
        if named is not None:
            return [named] if 0 <= named < len(self.bytes) else []
        if entry.raw is not None:
            found = self.by_bytes.get(entry.raw, [])
        elif REPLACEMENT in entry.token:
            found = self.by_text.get(entry.token, [])
        else:
            found = self.by_bytes.get(entry.token.encode(), [])
        # a server shows a special token as its text: prefer it where a plain token spells the same
        return sorted(found, key=lambda i: i not in self.added)

    def resolve(self, entry: Entry) -> int | None:
        return self._pick(self.candidates(entry))

    def _pick(self, found: list[int]) -> int | None:
        return found[0] if len(found) == 1 or (found and found[0] in self.added) else None

    def resolve_path(self, path: list[Entry], text: str | None) -> None:
        """Set `id` on each entry of a rollout, and on its alternatives where they resolve on their own.
        Runs of lossy chosen tokens are resolved together: their bytes must spell their part of `text`."""
        for entry in path:
            for alt in entry.top:
                alt.id = self.resolve(alt)
        options = [self.candidates(entry) for entry in path]
        if text is None or all(self._pick(o) is not None for o in options):
            for entry, option in zip(path, options):
                entry.id = self._pick(option)
            return
        target = text.encode()
        ids = self._spell(options, target, 0, 0, [])
        if ids is None:  # resolve up to the first token the text cannot settle
            first = next(k for k, o in enumerate(options) if self._pick(o) is None)
            ids = [self._pick(o) for o in options[:first]]
        for k, entry in enumerate(path):
            entry.id = ids[k] if k < len(ids) else None

    def _spell(self, options: list[list[int]], target: bytes, k: int, at: int, ids: list[int]) -> list[int] | None:
        """Depth-first: ids for options[k:] whose bytes are target[at:] (a rollout is short, the choices few)."""
        if k == len(options):
            return list(ids) if at == len(target) else None
        for candidate in options[k]:
            data = self.bytes[candidate]
            if target.startswith(data, at):
                ids.append(candidate)
                found = self._spell(options, target, k + 1, at + len(data), ids)
                ids.pop()
                if found is not None:
                    return found
        return None
