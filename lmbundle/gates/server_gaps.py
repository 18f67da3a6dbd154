"""Logprob entries a server left out of a rollout, asked for again one position at a time.

llama-server lists no logprob entry for a generated token after which its text ends inside a UTF-8 character: it
holds those bytes back and gives them to the next entry it lists, so a rollout in CJK or emoji, and any fresh-init
model's, has holes where neither the token nor its distribution is known (`usage.completion_tokens` counts them).
Asking again at a hole (the prompt and the path so far as token ids, `max_tokens` 1) meets the same hole: the one
token is held back alike. What such a server does list is a token that is a whole character on its own, pushed to
be chosen with `logit_bias`; its entry carries the top_logprobs of the model's distribution at that position, which
llama-server (and ours) report before their samplers, and the top-1 there is the greedy token the server held
back. That the distribution comes before the bias is checked, not assumed: two different pushed tokens must list
the same distribution (after the bias, each would lead its own).

A hole's tokens spell the bytes that the next listed entry carries beyond its own token: at each position the
token taken is the most likely listed one whose bytes go on spelling them (the top-1 but at a near-tie the server's
prompt pass breaks otherwise than its decode did). A hole at the end (max_tokens ran out inside a character) is
filled by count. Where a server takes no token-id prompts or no logit_bias, or reports log-probs after the bias,
the holes stay, `refusal` says why, and the gate checks each such rollout only up to its first hole.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .server_client import Completion, Server
from .server_tokens import Entry, TokenTable

SAME_DISTRIBUTION = 0.5  # nats: two answers on one prefix agree far closer; a bias of 100 moves them far more
WHOLE = b".,;:!?aeiou"  # single-byte tokens to push: each a whole character, whatever comes before it


class GapFiller:
    """Fills the holes of rollouts from one server; `filled` counts the positions it asked for again."""

    def __init__(self, server: Server, table: TokenTable):
        self.server, self.table = server, table
        self.push = [i for b in WHOLE for i in table.by_bytes.get(bytes([b]), []) if i not in table.added][:2]
        self.refusal: str | None = None  # None: not asked yet; "": the server fills holes; else why it cannot
        self.filled = 0

    def fill(self, ids: list[int], completion: Completion) -> Completion:
        """`completion` with the entries it left out asked for again (its entries' ids resolved); as it came
        where it has no holes, where the server cannot fill them, or where its listed entries cannot be placed."""
        generated = completion.generated or 0
        if generated <= len(completion.path) or not self._ready(ids):
            return completion
        path: list[Entry] = []
        for entry in completion.path:
            held = self._held(entry)
            while held:
                found = self._position(ids + [e.id for e in path], held)
                if found is None:
                    return completion
                path.append(found)
                held = held[len(found.raw):]
            if held is None:
                return completion
            path.append(replace(entry, raw=self.table.bytes[entry.id]))
        while len(path) < generated:
            found = self._position(ids + [e.id for e in path], None)
            if found is None:
                return completion
            path.append(found)
        if len(path) != generated:  # the held bytes were spelled with other tokens than the server's
            return completion
        self.filled += len(path) - len(completion.path)
        return replace(completion, path=path)

    def _held(self, entry: Entry) -> bytes | None:
        """The bytes a listed entry carries before its own token's (those of the hole before it); None where the
        entry says too little to tell."""
        if entry.id is None or entry.raw is None:
            return None
        own, raw = self.table.bytes[entry.id], entry.raw
        if raw.endswith(own):
            return raw[: len(raw) - len(own)]
        return raw if entry.id in self.table.added else None  # a special token the server renders as nothing

    def _position(self, prefix: list[int], held: bytes | None) -> Entry | None:
        """The server's entry at the end of `prefix`: its most likely listed token whose bytes begin `held`
        (any token at a hole at the end), with the whole distribution listed there as alternatives."""
        answer = self.server.pushed(prefix, self.push[0])
        if answer is None:
            return None
        listed = [e for e in [answer, *answer.top] if math.isfinite(e.logprob)]
        for e in sorted(listed, key=lambda e: -e.logprob):
            token = self.table.resolve(e)
            data = self.table.bytes[token] if token is not None else b""
            if data and (held is None or held.startswith(data)):
                return Entry(e.token, e.logprob, data, token, top=[answer, *answer.top])
        return None

    def _ready(self, ids: list[int]) -> bool:
        """Whether the server can fill holes, found out at its first hole (the prompt `ids` as the prefix)."""
        if self.refusal is None:
            why = self.server.refuses_token_ids(ids)
            if why:
                self.refusal = f"takes no token-id prompts ({why})"
            elif len(self.push) < 2:
                self.refusal = "has no two single-character tokens to push with logit_bias"
            else:
                self.refusal = self._pushed_distributions_agree(ids)
        return not self.refusal

    def _pushed_distributions_agree(self, ids: list[int]) -> str:
        """"" where two pushed tokens after `ids` are each chosen and list the same distribution; else what
        the server does instead."""
        answers = []
        for token in self.push:
            try:
                answer = self.server.pushed(ids, token)
            except self.server.status_error as exc:
                if exc.status_code not in (400, 422):
                    raise
                return f"takes no logit_bias ({self.server.refusal(exc)})"
            if answer is None or self.table.resolve(answer) != token:
                return "does not list the token logit_bias pushes"
            if not answer.top:
                return "lists no top_logprobs with the token logit_bias pushes"
            answers.append({self.table.resolve(e): e.logprob for e in [*answer.top, answer]})
        first, second = answers
        common = first.keys() & second.keys()
        if max(first, key=first.get) != max(second, key=second.get) or \
                any(abs(first[i] - second[i]) > SAME_DISTRIBUTION for i in common if i is not None):
            return "reports log-probs after logit_bias (two pushed tokens list different distributions)"
        return ""
