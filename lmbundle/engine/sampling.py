"""Choosing the next token on the device that holds the logits (no host round trip per token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LmbundleError

# Temperatures below this choose greedily (vLLM's threshold too): dividing by them would overflow the logits
# (5e-324 is 0 in fp32), and the distribution they describe is the argmax's up to logit differences below
# what the model's arithmetic resolves.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    """temperature 0 (below GREEDY_BELOW) is greedy (argmax); top_k 0, top_p 1 and min_p 0 disable those filters.

    `processors` change the logits before the choice, in order, on the logits' device (penalties, a
    logit bias, a grammar's mask, a logprob recorder): each is called as `p(logits) -> logits` and
    told the chosen token tensor with `p.chosen(token)` where it has that method. One that needs the
    previous token on the host (a grammar) says so with `needs_host = True`; the engine then picks
    token n+1 only after it has read token n and called `p.accept(n)` (see Engine.generate)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    processors: tuple = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise LmbundleError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LmbundleError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LmbundleError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise LmbundleError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def needs_host(self) -> bool:
        return any(getattr(p, "needs_host", False) for p in self.processors)

    def accept(self, token: int) -> None:
        """Token n as read on the host, for the processors that need it before token n+1 is chosen."""
        for p in self.processors:
            if getattr(p, "needs_host", False):
                p.accept(token)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token [1, 1] (int64, on logits' device) from logits [..., V]."""
    logits = logits.reshape(-1).float()
    for processor in sampling.processors:
        logits = processor(logits)
    token = _choose(logits, sampling, generator)
    for processor in sampling.processors:
        if hasattr(processor, "chosen"):
            processor.chosen(token)
    return token


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if sampling.greedy:
        return logits.argmax().view(1, 1)
    logits = (logits - logits.max()) / sampling.temperature  # at most 0: no overflow to inf - inf
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.min_p > 0:  # keep tokens at least min_p times as likely as the most likely one
        probs = probs.masked_fill(probs < sampling.min_p * probs.max(), 0.0)
    return torch.multinomial(probs, 1, generator=generator).view(1, 1)


class Penalties:
    """OpenAI's presence / frequency penalties over the tokens generated so far, and a logit bias;
    the counts live on the device and are updated from the chosen token tensor (no host read)."""

    def __init__(self, vocab: int, device: torch.device, presence: float = 0.0, frequency: float = 0.0,
                 bias: dict[int, float] | None = None):
        self.presence, self.frequency = presence, frequency
        self.counts = torch.zeros(vocab, device=device) if presence or frequency else None
        self.bias = None
        if bias:
            dense = torch.zeros(vocab)
            dense[torch.tensor(list(bias), dtype=torch.long)] = torch.tensor(list(bias.values()), dtype=torch.float)
            self.bias = dense.to(device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        n = logits.numel()
        if self.bias is not None:
            logits = logits + self.bias[:n]
        if self.counts is not None:
            counts = self.counts[:n]
            logits = logits - self.frequency * counts - self.presence * (counts > 0).float()
        return logits

    def chosen(self, token: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts.index_add_(0, token.view(-1), torch.ones(1, device=self.counts.device))


class Logprobs:
    """Records, per chosen token, its log-probability and the `top` most likely tokens under the model's
    own distribution (the logits as they come to this recorder, before temperature and filters).
    Put it first among the processors to see the raw model. On CUDA each record starts its copy to
    pinned host memory when it is made, so reading it waits for that copy only, not for the step
    enqueued after it (the same reason as the engine's PendingToken)."""

    def __init__(self, top: int):
        self.top = top
        self.records: list[tuple[torch.Tensor, object] | None] = []
        self._last: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._last = torch.log_softmax(logits.float(), dim=-1)
        return logits

    def chosen(self, token: torch.Tensor) -> None:
        logprobs, self._last = self._last, None
        parts = [logprobs.gather(0, token.view(-1))]
        if self.top:
            values, ids = torch.topk(logprobs, self.top)
            parts += [values, ids.double()]  # token ids stay exact as float64
        packed = torch.cat([p.double() for p in parts])
        if packed.device.type != "cuda":
            self.records.append((packed, None))
            return
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.records.append((host, copied))

    def read(self, index: int) -> tuple[float, list[tuple[int, float]]]:
        """(the chosen token's logprob, [(token id, logprob)] of the top tokens) of the index-th choice."""
        packed, copied = self.records[index]
        self.records[index] = None
        if copied is not None:
            copied.synchronize()
        values = packed.tolist()
        top = self.top
        return values[0], [(int(t), v) for v, t in zip(values[1:1 + top], values[1 + top:])]
