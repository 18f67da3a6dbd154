"""The engine a user runs: a bundle + its tokenizer + a backend, and the pipelined generate loop.

Pipelining: the host enqueues step n+1 (fed with token n, still on the device) before it reads token n,
so the device never waits for the host. Warm-up is a real 1-token generate.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..bundle.format import Bundle, open_bundle
from ..bundle.load import load_graph
from ..errors import LmbundleError
from . import BACKENDS
from .prefix_cache import PrefixCache
from .prompt import ChatPrompt, render_chat
from .sampling import Sampling
from .torch_backend import TorchBackend, pick_device
from .vision import ImagePrompts, split_images

_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
DEFAULT_CACHE_BYTES = 1 << 30  # the prefix cache's budget on the device (4x that on the host behind it)


def default_backend() -> str:
    """The fastest backend present: Core AI where the OS runs it on the GPU (macOS), else PyTorch."""
    import platform

    return "coreai" if platform.system() == "Darwin" and platform.mac_ver()[0] >= "27" else "torch"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # the prompt's prefix that the state already held (a chat's earlier turns)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # until the first generated token is known
    decode_seconds: float = 0.0  # from the first to the last generated token
    stop_reason: str = "length"
    extra: dict = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        fed = self.prompt_tokens - self.cached_tokens
        return fed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def _extends(ids: list[int], prefix: list[int]) -> bool:
    return len(prefix) < len(ids) and ids[: len(prefix)] == prefix


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


class Engine:
    def __init__(self, bundle: Bundle | str | os.PathLike, backend: str | None = None, device: str | None = None,
                 verify: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES, cache_host_bytes: int | None = None,
                 cache_block: int = 256, max_batch: int = 1, token_budget: int = 512):
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise LmbundleError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})")
        self.tokenizer = self.bundle.load_tokenizer(verify=verify)
        self.max_context = self.bundle.max_context
        self.stop_ids = self._stop_ids()
        if backend == "torch":
            self.device = pick_device(device)
            dtype = {"cuda": torch.bfloat16, "mps": torch.float16}.get(self.device.type, torch.float32)
            model = load_graph(self.bundle, self.device, dtype, verify=verify)
            self.backend = TorchBackend(model, self.device, self.max_context)
            self.vision = ImagePrompts.for_bundle(self.bundle, self.device, dtype, verify=verify)
            if self.vision:  # one context for the engine's life, rewritten in place per prompt
                model.set_images(self.vision.context)
        else:
            from .coreai_backend import CoreAIBackend

            self.device = torch.device("cpu")
            self.backend = CoreAIBackend(self.bundle, verify=verify)
            self.vision = None  # an asset exported before the decoder took image inputs: text only
            if self.backend.takes_images:
                self.vision = ImagePrompts.for_bundle(self.bundle, self.device, torch.float32, verify=verify)
                self.vision.on_write = self.backend.set_images
        self.backend_name = backend
        self._held: tuple[list[int], int] | None = None  # (tokens the state holds, backend.writes then)
        self._lock = threading.Lock()  # one request at a time on the one state (serve runs several threads)
        self._batch_size = 0
        self.totals: Counter[str] = Counter(dict.fromkeys(  # what has been served (read by /metrics)
            ("requests", "prompt_tokens", "cached_tokens", "generated_tokens"), 0))
        self._totals_lock = threading.Lock()
        host = 4 * cache_bytes if cache_host_bytes is None else cache_host_bytes
        self.prefix_cache = PrefixCache(cache_bytes if self.backend.resumable else 0, host, self.device, cache_block)
        start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        self._message_start = start if isinstance(start, int) and start != self.tokenizer.unk_token_id else None
        self.scheduler = None  # continuous batching of text prompts (the torch backend, max_batch > 1)
        if max_batch > 1 and backend == "torch" and self.vision is None:
            from .batch import BatchScheduler

            self.scheduler = BatchScheduler(self, max_batch, token_budget, chunk=cache_block)

    def forget(self) -> None:
        """Start the next prompt cold: no state kept from the last call, an empty prefix cache (benchmarks
        time prompts, not cache hits)."""
        self._held = None
        self.prefix_cache.clear()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    @property
    def batch_size(self) -> int:
        """Sequences in the step being run (for /health and /metrics)."""
        return self.scheduler.batch_size if self.scheduler is not None else self._batch_size

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    def attach_images(self, sources: list) -> list[dict]:
        """Images (paths, bytes, PIL) -> chat content parts; a resize notice goes to stderr once."""
        self._check_vision()
        return self.vision.attach(sources)

    def _check_vision(self) -> None:
        if self.vision is not None:
            return
        if "vision" in self.bundle.metadata:
            raise LmbundleError(f"{self.bundle.aimodel_path}: this .aimodel takes no image inputs "
                                "(convert the checkpoint again for image prompts on Core AI)")
        raise LmbundleError(f"{self.bundle.path}: this bundle has no vision encoder; images need a VLM bundle")

    def _stop_ids(self) -> set[int]:
        ids = set(self.bundle.info["config"].get("eos_token_id") or [])
        gen_config = self.bundle.tokenizer_path / "generation_config.json"
        if gen_config.exists():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for tok in _STOP_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return ids

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 template_kwargs: dict | None = None) -> list[int]:
        return self.chat_prompt(messages, tools, template_kwargs).ids

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> ChatPrompt:
        """The chat template's prompt; message text is always tokenized as text (prompt.py)."""
        if not self.tokenizer.chat_template:
            raise LmbundleError(f"{self.bundle.tokenizer_path}: the tokenizer has no chat template")
        messages, images = split_images(messages)
        if images:
            self._check_vision()
        prompt = render_chat(self.tokenizer, messages, tools, template_kwargs)
        if images:
            prompt.ids = self.vision.image_prompt(prompt.ids, images)
        return prompt

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise LmbundleError("empty prompt")
        if prompt_len + max_new_tokens > self.max_context:
            raise LmbundleError(
                f"context too long: {prompt_len} prompt tokens + {max_new_tokens} new tokens > "
                f"the bundle's maximum of {self.max_context}"
            )

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        ids: list[int],
        max_new_tokens: int = 128,
        sampling: Sampling = Sampling(),
        prefill_chunk: int = 0,
        stop: bool = True,
        stats: GenerationStats | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids as they become known (the stop token is not yielded); callers on
        several threads take turns (the lock is held from the first token asked for to the last)."""
        self.check_length(len(ids), max_new_tokens)
        stats = stats if stats is not None else GenerationStats()
        # with the other requests, one step for all; logits processors (grammar, penalties, logprobs)
        # run on the one-request path
        if self.scheduler is not None and self.keeps(ids) and not sampling.processors:
            try:
                yield from self.scheduler.generate(ids, max_new_tokens, sampling, prefill_chunk, stop, stats)
            finally:
                self.count(stats)
            return
        with self._lock:
            self._batch_size = 1
            try:
                yield from self._generate(ids, max_new_tokens, sampling, prefill_chunk, stop, stats)
            finally:
                self._batch_size = 0
                self.count(stats)

    def count(self, stats: GenerationStats) -> None:
        with self._totals_lock:  # requests end on several threads at once when batching
            self.totals.update(requests=1, prompt_tokens=stats.prompt_tokens, cached_tokens=stats.cached_tokens,
                               generated_tokens=stats.generated_tokens)

    def _generate(self, ids: list[int], max_new_tokens: int, sampling: Sampling, prefill_chunk: int, stop: bool,
                  stats: GenerationStats) -> Iterator[int]:
        """Yield generated token ids as they become known (the stop token is not yielded).

        The longest prefix of `ids` that the state already holds (what the last call left: a chat's
        next turn) or that the prefix cache holds (an earlier prompt, reply or shared system prompt,
        whoever sent it) is restored, and only the rest is prefilled (`stats.cached_tokens`)."""
        stats.prompt_tokens = len(ids)
        if self.vision is not None:
            self.vision.activate(ids)
        backend = self.backend
        generator = sampling.generator(self.device)
        start = time.perf_counter()
        keep = self.keeps(ids)
        room = len(ids) + max_new_tokens
        held, handle = self._resume(ids, room) if keep else (0, None)
        self._held = None
        if not held:
            backend.reset(room)
        if handle is None:  # else the whole prompt came from the cache, with its logits
            handle = self._prefill(ids, held, prefill_chunk, keep)
        stats.cached_tokens = held
        token = backend.next_token(handle, sampling, generator)
        fed = list(ids)  # what the state holds: the prompt, then each token a step was enqueued for
        position = len(ids)
        first = None
        host_bound = sampling.needs_host  # a grammar: token n+1 is chosen once token n is known here
        try:
            for i in range(max_new_tokens):
                following = step = None
                if i + 1 < max_new_tokens:  # enqueue step n+1 before reading token n
                    step = backend.step(token, position)
                    if not host_bound:
                        following = backend.next_token(step, sampling, generator)
                    position += 1
                value = backend.read_token(token)
                if host_bound:  # the step n+1 runs on the device while the host advances the grammar
                    sampling.accept(value)
                    if step is not None and not (stop and value in self.stop_ids):
                        following = backend.next_token(step, sampling, generator)
                if step is not None:
                    fed.append(value)
                if keep:  # consistent here: every step enqueued so far fed a token now in `fed`
                    self._held = (fed, backend.writes)
                now = time.perf_counter()
                if first is None:
                    first = now
                    stats.prefill_seconds = now - start
                stats.decode_seconds = now - first
                if stop and value in self.stop_ids:
                    stats.stop_reason = "stop"
                    return
                stats.generated_tokens += 1
                yield value
                token = following
        finally:  # the reply too: the next turn of this chat resumes after it, whoever comes in between
            if keep and self._held is not None and self._held[1] == backend.writes and len(fed) > len(ids):
                self._remember(fed)

    def _prefill(self, ids: list[int], held: int, chunk: int, keep: bool):
        """Prefill ids[held:], snapshotting the state into the prefix cache at its cut points. Pieces end at
        absolute cut points, so a prompt is split the same way whether it starts from a cached prefix or not."""
        backend, pos, handle = self.backend, held, None
        cuts = self._cuts(ids, held) if keep and self.prefix_cache.enabled else []
        for cut in [*cuts, len(ids)]:
            last = cut == len(ids)
            if pos == 0 and last:  # the whole prompt: every backend's plain call
                handle = backend.prefill(ids, chunk)
            else:
                handle = backend.prefill(ids[pos:cut], chunk, start=pos, with_head=last)
            if keep:
                self._remember(ids[:cut], handle.logits if last else None)
            pos = cut
        return handle

    def _cuts(self, ids: list[int], held: int) -> list[int]:
        """Where the state is snapshotted inside a prompt: block multiples and where a chat message starts
        (a shared system prompt, a turn). Its end is snapshotted too, with the logits of its last token."""
        block, marker = self.prefix_cache.block, self._message_start
        return [p for p in range(held + 1, len(ids)) if p % block == 0 or (marker is not None and ids[p] == marker)]

    def _remember(self, ids: list[int], logits: torch.Tensor | None = None, state=None) -> None:
        """What the backend's state (or `state`, a batch slot) holds after `ids` into the prefix cache, with
        the logits of their last token when given."""
        cache = self.prefix_cache
        if cache.enabled and not cache.contains(ids):
            tensors = self.backend.snapshot_prefix(len(ids)) if state is None else state.prefix(len(ids))
            cache.insert(ids, tensors, logits)

    def keeps(self, ids: list[int]) -> bool:
        """Whether a prompt's states can be kept and resumed (text prompts on a backend that exposes its state)."""
        return self.backend.resumable and self._text_only(ids)

    def _resume(self, ids: list[int], length: int):
        """Put the backend in the longest known state that `ids` extends: what it holds from the last
        call (the prompt and the reply as generated), else the longest prefix in the prefix cache (all
        of `ids` when it was a prompt before: its last token's logits were kept). Returns how many
        leading tokens of `ids` it holds (0: none) and, when it holds them all, the step whose logits
        pick the first new token (else None)."""
        live = 0
        if self._held is not None:
            fed, writes = self._held
            if writes == self.backend.writes and _extends(ids, fed):
                live = len(fed)
        cached, entry = self.prefix_cache.lookup(ids, limit=len(ids), min_length=live + 1)
        if entry is not None:
            last = self.backend.restore_prefix(entry.state, cached, length, entry.logits)
            return cached, last if cached == len(ids) else None
        if live:
            self.backend.make_room(length)
        return live, None

    def _text_only(self, ids: list[int]) -> bool:
        vocab = self.bundle.info["config"]["vocab_size"]
        return all(t < vocab for t in ids)

    def generate_text(self, ids: list[int], **kwargs) -> Iterator[str]:
        """Stream text pieces of the generated tokens."""
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate(ids, **kwargs):
            piece = decoder.push(token)
            if piece:
                yield piece
        if tail := decoder.flush():
            yield tail

    def warmup(self) -> None:
        """A real 1-token generate (what the seed engine does; a long warm-up would not fit a [1,1] step);
        with the batch scheduler, its prompt pieces' graphs too (a server's first prompts would each wait
        for one)."""
        for _ in self.generate(self.encode("Hello") or [0], max_new_tokens=1, stop=False):
            pass
        if self.scheduler is not None:
            self.scheduler.warm()
