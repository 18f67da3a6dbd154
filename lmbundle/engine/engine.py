"""The engine a user runs: a bundle + its tokenizer + a backend, and the pipelined generate loop.

Pipelining: the host enqueues step n+1 (fed with token n, still on the device) before it reads token n,
so the device never waits for the host. Warm-up is a real 1-token generate.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..bundle.format import Bundle, open_bundle
from ..bundle.load import load_graph
from ..errors import LmbundleError
from . import BACKENDS
from .sampling import Sampling
from .torch_backend import TorchBackend, pick_device
from .vision import ImagePrompts, split_images

_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


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

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted :]
        self.prefix = max(self.prefix, len(self.ids) - 4)
        self.emitted = len(self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True))
        return new

    def flush(self) -> str:
        """What is still held back at the end (bytes that never completed a character show as U+FFFD)."""
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        tail, self.emitted = text[self.emitted :], len(text)
        return tail


class Engine:
    def __init__(self, bundle: Bundle | str | os.PathLike, backend: str | None = None, device: str | None = None,
                 verify: bool = True):
        from transformers import AutoTokenizer

        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise LmbundleError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.bundle.tokenizer_path))
        except Exception as exc:
            raise LmbundleError(f"{self.bundle.tokenizer_path}: cannot load tokenizer ({str(exc)[:200]})") from None
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
        self._prompt_snapshot: tuple[list[int], object] | None = None  # (last text prompt, its state)

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

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise LmbundleError(f"{self.bundle.tokenizer_path}: the tokenizer has no chat template")
        messages, images = split_images(messages)
        if images:
            self._check_vision()
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return self.vision.image_prompt(list(ids), images) if images else list(ids)

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
        """Yield generated token ids as they become known (the stop token is not yielded).

        When `ids` extends what an earlier call left (a chat's next turn: the earlier turns, the reply,
        then the new message), only the new tokens are prefilled (`_resume`)."""
        self.check_length(len(ids), max_new_tokens)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(ids)
        if self.vision is not None:
            self.vision.activate(ids)
        backend = self.backend
        generator = sampling.generator(self.device)
        start = time.perf_counter()
        keep = backend.resumable and self._text_only(ids)
        held = self._resume(ids, len(ids) + max_new_tokens) if keep else 0
        self._held = None
        if held:
            handle = backend.prefill(ids[held:], prefill_chunk, start=held)
        else:
            backend.reset(len(ids) + max_new_tokens)
            handle = backend.prefill(ids, prefill_chunk)
        if keep:  # the prompt's state: the next turn resumes here if its reply tokenizes differently
            self._prompt_snapshot = (list(ids), backend.snapshot())
        stats.cached_tokens = held
        token = backend.next_token(handle, sampling, generator)
        fed = list(ids)  # what the state holds: the prompt, then each token a step was enqueued for
        position = len(ids)
        first = None
        for i in range(max_new_tokens):
            following = None
            if i + 1 < max_new_tokens:  # enqueue step n+1 before reading token n
                following = backend.next_token(backend.step(token, position), sampling, generator)
                position += 1
            value = backend.read_token(token)
            if following is not None:
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

    def _resume(self, ids: list[int], length: int) -> int:
        """Put the backend in the longest known state that `ids` extends: what it holds from the last
        call (the prompt and the reply as generated), else the last prompt's snapshot (a chat template
        may tokenize the reply differently). Returns how many leading tokens of `ids` it holds (0: none)."""
        if self._held is not None:
            fed, writes = self._held
            if writes == self.backend.writes and _extends(ids, fed):
                self.backend.make_room(length)
                return len(fed)
        if self._prompt_snapshot is not None:
            prompt, saved = self._prompt_snapshot
            if _extends(ids, prompt):
                self.backend.restore(saved, length)
                return len(prompt)
        return 0

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
        """A real 1-token generate (what the seed engine does; a long warm-up would not fit a [1,1] step)."""
        for _ in self.generate(self.encode("Hello") or [0], max_new_tokens=1, stop=False):
            pass
