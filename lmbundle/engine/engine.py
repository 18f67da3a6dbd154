"""The engine a user runs: a bundle + its tokenizer + a backend. `Engine.generate(Request)` yields `Output`s.

A request is built into a `Prompt` (its token ids, its images' context), then decoded on one of two paths:
with continuous batching on (`max_batch` > 1) a text request joins the batch scheduler's loop
(`batching.py`), which steps every request at once; else (and for requests whose logits are changed on
the host: logprobs, penalties, a grammar) the one-request loop here runs it, one request at a time.
Either way its tokens become Outputs in one place (`outputs.py`: stop tokens, the token limit, stop
strings, detokenization).

The one-request loop is pipelined: the host enqueues step n+1 (fed with token n, still on the device)
before it reads token n, so the device never waits for the host. Warm-up is a real 1-token generate.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ..bundle.format import Bundle, open_bundle
from ..bundle.load import load_graph
from ..errors import ContextTooLong, LmbundleError
from . import BACKENDS
from .backend import Backend
from .batching import BatchLoop
from .grammar import GrammarConstraint
from .outputs import OutputStream, TokenStops, token_bytes
from .prefix_cache import PrefixCache
from .prompt import Prompt, PromptBound, render_chat
from .request import Completion, Output, Request, Stats, TokenLogprobs
from .sampling import Logprobs, Penalties, Sampling
from .scheduler import Scheduler
from .torch_backend import CudaOptions, TorchBackend, pick_device
from .vision import ImagePrompts, split_images

_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
DEFAULT_CACHE_BYTES = 1 << 30  # the prefix cache's budget on the device (4x that on the host behind it)


def default_backend() -> str:
    """The fastest backend present: Core AI where the OS runs it on the GPU (macOS), else PyTorch."""
    import platform

    return "coreai" if platform.system() == "Darwin" and platform.mac_ver()[0] >= "27" else "torch"


def _extends(ids: list[int], prefix: list[int]) -> bool:
    return len(prefix) < len(ids) and ids[: len(prefix)] == prefix


class Engine:
    """A bundle ready to generate.

    `cache_bytes` / `cache_host_bytes`: the prefix cache's budgets (`prefix_cache.py`); `cache_block`: its
    block, also the batch scheduler's prompt piece; `max_batch` > 1: continuous batching of up to that many
    requests, `token_budget` tokens of decode rows and prompt pieces per scheduler iteration;
    `prefill_chunk`: how prompts are fed unless a request says otherwise (0: single-token steps, the seed
    engine's contract; n: chunks of n tokens); `cuda`: the CUDA code paths (`torch_backend.CudaOptions`)."""

    def __init__(self, bundle: Bundle | str | os.PathLike, backend: str | None = None, device: str | None = None,
                 verify: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES, cache_host_bytes: int | None = None,
                 cache_block: int = 256, max_batch: int = 1, token_budget: int = 512, prefill_chunk: int = 0,
                 cuda: CudaOptions = CudaOptions()):
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise LmbundleError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})")
        self.tokenizer = self.bundle.load_tokenizer(verify=verify)
        self.max_context = self.bundle.max_context
        self.prompt_bound = PromptBound(self.tokenizer, self.max_context)
        self.vocab_size = int(self.bundle.info["config"]["vocab_size"])
        self.generation_config = self._generation_config()
        self.stop_ids = self._stop_ids()
        self.prefill_chunk = prefill_chunk
        self.backend: Backend
        if backend == "torch":
            self.device = pick_device(device)
            dtype = {"cuda": torch.bfloat16, "mps": torch.float16}.get(self.device.type, torch.float32)
            model = load_graph(self.bundle, self.device, dtype, verify=verify)
            self.backend = TorchBackend(model, self.device, self.max_context, cuda)
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
        self._lock = threading.Lock()  # one request at a time on the one-request path's state
        self._prompt_lock = threading.RLock()  # one prompt built at a time (tokenizer, image encoder)
        self._batch_size = 0
        self.totals: Counter[str] = Counter(dict.fromkeys(  # what has been served (read by /metrics)
            ("requests", "prompt_tokens", "cached_tokens", "generated_tokens"), 0))
        self._totals_lock = threading.Lock()
        host = 4 * cache_bytes if cache_host_bytes is None else cache_host_bytes
        start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        marker = start if isinstance(start, int) and start != self.tokenizer.unk_token_id else None
        self.prefix_cache = PrefixCache(cache_bytes if self.backend.resumable else 0, host, self.device, cache_block,
                                        marker)
        self.scheduler: Scheduler | None = None  # continuous batching of text prompts (torch, max_batch > 1)
        if max_batch > 1 and backend == "torch" and self.vision is None:
            self.scheduler = Scheduler(self.backend, self.prefix_cache, max_batch, token_budget, cache_block, cuda)
            self._batch = BatchLoop(self.scheduler)

    def forget(self) -> None:
        """Start the next prompt cold: no state kept from the last call, an empty prefix cache (benchmarks
        time prompts, not cache hits)."""
        self._held = None
        self.prefix_cache.clear()

    def close(self) -> None:
        if self.scheduler is not None:
            self._batch.close()
        self.backend.close()

    # -- what the bundle is -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    @property
    def created(self) -> int:
        """When the bundle was written (Unix time)."""
        return int(Path(self.bundle.path).stat().st_mtime)

    @property
    def chat_template(self) -> str:
        template = self.tokenizer.chat_template or ""
        return template if isinstance(template, str) else json.dumps(template)

    def sampling_defaults(self) -> dict:
        """The checkpoint's recommended sampling (generation_config.json), else OpenAI's defaults."""
        config = self.generation_config
        sampled = config.get("do_sample", True)
        return {"temperature": float(config.get("temperature", 1.0)) if sampled else 0.0,
                "top_p": float(config.get("top_p", 1.0)), "top_k": int(config.get("top_k", 0) or 0)}

    @property
    def tokenizer_size(self) -> int:
        """Token ids the tokenizer knows (a text prompt's ids are below it)."""
        return len(self.tokenizer)

    def token_bytes(self, token: int) -> list[int]:
        return token_bytes(self.tokenizer, token)

    def _generation_config(self) -> dict:
        path = self.bundle.tokenizer_path / "generation_config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _stop_ids(self) -> frozenset[int]:
        ids = set(self.bundle.info["config"].get("eos_token_id") or [])
        eos = self.generation_config.get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for tok in _STOP_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return frozenset(ids)

    # -- what it is doing (/health, /metrics) ------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Sequences in the step being run."""
        return self.scheduler.batch_size if self.scheduler is not None else self._batch_size

    def counts(self) -> dict:
        """Requests and tokens served, the batch being stepped, the prefix cache and the batch scheduler's
        time by phase."""
        cache, scheduler = self.prefix_cache, self.scheduler
        return {"batch_size": self.batch_size, "totals": dict(self.totals),
                "cache": cache.stats() if cache.enabled else None,
                "scheduler": None if scheduler is None else {"seconds": dict(scheduler.seconds),
                                                             "steps": scheduler.steps}}

    def count(self, stats: Stats) -> None:
        with self._totals_lock:  # requests end on several threads at once when batching
            self.totals.update(requests=1, prompt_tokens=stats.prompt_tokens, cached_tokens=stats.cached_tokens,
                               generated_tokens=stats.generated_tokens)

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        self.prompt_bound.check(text)
        with self._prompt_lock:
            return self.tokenizer.encode(text, add_special_tokens=False)

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

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 template_kwargs: dict | None = None) -> list[int]:
        return self.chat_prompt(messages, tools, template_kwargs).ids

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> Prompt:
        """The chat template's prompt, its images encoded; message text is always tokenized as text (prompt.py)."""
        if not self.tokenizer.chat_template:
            raise LmbundleError(f"{self.bundle.tokenizer_path}: the tokenizer has no chat template")
        messages, images = split_images(list(messages))
        if images:
            self._check_vision()
        with self._prompt_lock:
            prompt = render_chat(self.tokenizer, messages, list(tools) if tools else None, template_kwargs,
                                 bound=self.prompt_bound)
            if images:
                prompt.ids, prompt.images = self.vision.image_prompt(prompt.ids, images)
        return prompt

    def prompt(self, request: Request) -> Prompt:
        """A request's prompt: its messages through the chat template, its text encoded, or its ids."""
        if request.messages is not None:
            return self.chat_prompt(request.messages, request.tools, request.template_kwargs)
        if isinstance(request.prompt, str):
            return Prompt(self.encode(request.prompt))
        return Prompt(list(request.prompt))

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise LmbundleError("empty prompt")
        if prompt_len + max_new_tokens > self.max_context:
            raise ContextTooLong(
                f"context too long: {prompt_len} prompt tokens + {max_new_tokens} new tokens > "
                f"the bundle's maximum of {self.max_context}"
            )

    def token_limit(self, request: Request, prompt_len: int) -> int:
        """The tokens a request may generate (`max_tokens`, else up to the context), checked against the context."""
        limit = request.max_tokens if request.max_tokens is not None else self.max_context - prompt_len
        self.check_length(prompt_len, max(limit, 1))
        return limit

    # -- generation -----------------------------------------------------------------------------
    def generate(self, request: Request, prompt: Prompt | None = None) -> Iterator[Output]:
        """The request's Outputs as their tokens become known: one per generated token (the stop token is
        not one), then the last, with the finish reason and the figures. `prompt`: the request's prompt when
        already built (`prompt(request)`). Errors in the request are raised here, before any work; callers
        on several threads take turns on the one-request path, or share the batch's steps."""
        prompt = self.prompt(request) if prompt is None else prompt
        limit = self.token_limit(request, len(prompt.ids))
        sampling, recorder = self._sampling(request, limit)
        stops = TokenStops(frozenset() if request.ignore_eos else self.stop_ids, limit)
        chunk = self.prefill_chunk if request.prefill_chunk is None else request.prefill_chunk
        stats = Stats(prompt_tokens=len(prompt.ids))
        if self.scheduler is not None and self.keeps(prompt.ids) and not sampling.processors:
            tokens = self._batch.generate(prompt.ids, stops, sampling, chunk, stats)
        else:
            tokens = self._one_request(prompt, stops, sampling, chunk, stats)
        return self._outputs(tokens, OutputStream(self.tokenizer, request.stop), recorder, stats)

    def complete(self, request: Request) -> Completion:
        """The whole answer to a request (`generate`, gathered)."""
        return Completion.of(self.generate(request))

    def _outputs(self, tokens: Iterator[int], stream: OutputStream, recorder: Logprobs | None,
                 stats: Stats) -> Iterator[Output]:
        try:
            for index, token in enumerate(tokens):
                yield stream.push(token, TokenLogprobs(*recorder.read(index)) if recorder is not None else None)
                if stream.stopped:
                    break
        finally:  # a stop string, or the caller gone: the tokens stop here (a batch slot is freed)
            tokens.close()
            self.count(stats)
        yield stream.finish(stats)

    def _sampling(self, request: Request, limit: int) -> tuple[Sampling, Logprobs | None]:
        """The request's sampling with the logits processors it asks for: the logprob recorder first (it sees
        the model's own distribution), then penalties and bias, then the grammar's mask."""
        recorder = Logprobs(request.logprobs) if request.logprobs is not None else None
        processors = [*([recorder] if recorder is not None else []), *request.sampling.processors]
        if request.penalized:
            processors.append(Penalties(self.vocab_size, self.device, request.presence_penalty,
                                        request.frequency_penalty, request.logit_bias))
        if request.grammar is not None:
            processors.append(GrammarConstraint(request.grammar, self.tokenizer, self.vocab_size, self.stop_ids,
                                                self.device, budget=limit))
        return replace(request.sampling, processors=tuple(processors)), recorder

    def keeps(self, ids: list[int]) -> bool:
        """Whether a prompt's states can be kept and resumed (text prompts on a backend that exposes its state)."""
        return self.backend.resumable and all(t < self.vocab_size for t in ids)

    # -- the one-request loop ---------------------------------------------------------------------
    def _one_request(self, prompt: Prompt, stops: TokenStops, sampling: Sampling, chunk: int,
                     stats: Stats) -> Iterator[int]:
        """Generated token ids as they become known (the stop token is not one); the lock is held from the
        first token asked for to the last."""
        with self._lock:
            self._batch_size = 1
            try:
                yield from self._generate(prompt, stops, sampling, chunk, stats)
            finally:
                self._batch_size = 0

    def _generate(self, prompt: Prompt, stops: TokenStops, sampling: Sampling, chunk: int,
                  stats: Stats) -> Iterator[int]:
        """The longest prefix of the prompt that the state already holds (what the last call left: a chat's
        next turn) or that the prefix cache holds (an earlier prompt, reply or shared system prompt, whoever
        sent it) is restored, and only the rest is prefilled (`stats.cached_tokens`)."""
        ids, limit = prompt.ids, stops.limit
        if self.vision is not None:
            self.vision.activate(ids, prompt.images)
        backend = self.backend
        generator = sampling.generator(self.device)
        start = time.perf_counter()
        keep = self.keeps(ids)
        room = len(ids) + limit
        held, handle = self._resume(ids, room) if keep else (0, None)
        self._held = None
        if not held:
            backend.reset(room)
        if handle is None:  # else the whole prompt came from the cache, with its logits
            handle = self._prefill(ids, held, chunk, keep)
        stats.cached_tokens = held
        token = backend.next_token(handle, sampling, generator)
        fed = list(ids)  # what the state holds: the prompt, then each token a step was enqueued for
        position = len(ids)
        first = None
        host_bound = sampling.needs_host  # a grammar: token n+1 is chosen once token n is known here
        try:
            for i in range(limit):
                following = step = None
                if i + 1 < limit:  # enqueue step n+1 before reading token n
                    step = backend.step(token, position)
                    if not host_bound:
                        following = backend.next_token(step, sampling, generator)
                    position += 1
                value = backend.read_token(token)
                if host_bound:  # the step n+1 runs on the device while the host advances the grammar
                    sampling.accept(value)
                    if step is not None and value not in stops.stop_ids:
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
                finish = stops.finish(value, stats.generated_tokens)
                if finish == "stop":
                    stats.stop_reason = "stop"
                    return
                stats.generated_tokens += 1
                yield value
                token = following
        finally:  # the reply too: the next turn of this chat resumes after it, whoever comes in between
            if keep and self._held is not None and self._held[1] == backend.writes and len(fed) > len(ids):
                self.prefix_cache.remember(fed, backend.snapshot_prefix)

    def _prefill(self, ids: list[int], held: int, chunk: int, keep: bool):
        """Prefill ids[held:], snapshotting the state into the prefix cache at its cut points. Pieces end at
        absolute cut points, so a prompt is split the same way whether it starts from a cached prefix or not."""
        backend, pos, handle = self.backend, held, None
        cache = self.prefix_cache
        cuts = cache.cuts(ids, held) if keep and cache.enabled else []
        for cut in [*cuts, len(ids)]:
            last = cut == len(ids)
            handle = backend.prefill(ids[pos:cut], chunk, start=pos, with_head=last)
            if keep:
                cache.remember(ids[:cut], backend.snapshot_prefix, handle.logits if last else None)
            pos = cut
        return handle

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

    def warmup(self) -> None:
        """A real 1-token generate (what the seed engine does; a long warm-up would not fit a [1,1] step);
        with the batch scheduler, its prompt pieces' graphs too (a server's first prompts would each wait
        for one)."""
        self.complete(Request(self.encode("Hello") or [0], max_tokens=1, ignore_eos=True))
        if self.scheduler is not None:
            self.scheduler.warm()
