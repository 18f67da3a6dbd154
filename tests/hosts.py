"""Small Python replicas of how each host binds and drives a bundle, on the Linux Core AI runtime.

They read only what the host reads (the asset's descriptors and metadata.json) and do what the host does
with it, written from the hosts' sources (docs/coreai.md, lmbundle/bundle/hosts/), not from lmbundle's
own backend:

- `ZooEngine`, the zoo's patched pipelined engine: states bound by position (the first two are the KV
  pair, grown from the engine's minimum by doubling; any other state must be static, else the engine's
  own error), the VLM decoder's 4 static inputs as fp16 buffers set once per image (the encoder asset run
  on the image first), a warm-up of one real token, the prompt as S=1 steps (COREAI_CHUNK_THRESHOLD=1).
- `AppleMainEngine`, Apple's pipelined engine on main: states classified by Apple's heuristic, the
  `prefill` function (looked up by that name, checked as Apple checks it) for all but the last prompt
  token in balanced chunks of `language.prefill_chunk_size`, then `main` steps; KV from 256 slots,
  pre-grown to prompt + max tokens.

Both sample greedily from the fp16 `logits` output, as the engines' GPU argmax does.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from lmbundle.bundle.coreai import compiled_entry, import_runtime

ZOO_MIN_KV = 2048  # the zoo's KV minimum capacity (bounded by the context)
APPLE_MIN_KV = 256  # Apple's engine starts the KV at min(256, max_context_length)
APPLE_DEFAULT_CHUNK = 2048  # Apple main's memory default when metadata has no prefill_chunk_size
NO_IMAGE_START = 2**30  # the seed's "no image" rope shift start


class HostError(RuntimeError):
    """What the host's engine raises at creation or on a call."""


class Host:
    """The runtime plumbing both hosts share: load the compiled asset, call functions with numpy arrays."""

    def __init__(self, bundle: Path, cache: Path):
        self.bundle = Path(bundle)
        self.meta = json.loads((self.bundle / "metadata.json").read_text())
        self.language = self.meta["language"]
        self.max_context = int(self.language["max_context_length"])
        _, self.runtime = import_runtime()
        self.loop = asyncio.new_event_loop()
        self.model = self._load(self.bundle / self.meta["assets"]["main"], cache)
        self.functions = {}

    def _load(self, aimodel: Path, cache: Path):
        compiled, _ = compiled_entry(aimodel, cache)
        return self.loop.run_until_complete(self.runtime.AIModel.load(compiled))

    def function(self, model, name: str):
        if name not in model.function_names:
            return None
        return model.load_function(name)

    def call(self, function, inputs: dict[str, np.ndarray], states: dict) -> dict[str, np.ndarray]:
        NDArray = self.runtime.NDArray
        arrays = {name: NDArray(np.ascontiguousarray(value)) for name, value in inputs.items()}
        outputs = self.loop.run_until_complete(function(arrays, states))
        return {name: np.array(value.numpy(), copy=True) for name, value in outputs.items()}

    @staticmethod
    def layout(desc, name: str) -> tuple[list[int], np.dtype]:
        d = desc.state_descriptor(name)
        return list(d.shape), np.dtype(d.dtype)

    def close(self) -> None:
        self.loop.close()


class ZooEngine(Host):
    """The zoo's patched pipelined engine (see the module docstring)."""

    def __init__(self, bundle: Path, cache: Path):
        super().__init__(bundle, cache)
        self.main = self.function(self.model, "main")
        desc = self.main.desc
        names = list(desc.state_names)
        self.key_name, self.value_name = names[0], names[1]  # by position
        for name in names[2:]:
            if -1 in self.layout(desc, name)[0]:
                raise HostError(f"Extra state '{name}' has dynamic dims")
        self.state_layout = {name: self.layout(desc, name) for name in names}
        self.static_inputs = [n for n in desc.input_names if n not in ("input_ids", "position_ids")]
        self.images: dict[str, np.ndarray] = {}
        vision = self.meta.get("vision")
        self.encoder = None
        if vision is not None:
            self.encoder = self.function(self._load(self.bundle / vision["asset"], cache), "main")
            self.set_image(None)
        self.reset()
        self.generate([1], 1)  # warm-up: one real token, then a fresh state
        self.reset()

    def reset(self) -> None:
        self.capacity = min(ZOO_MIN_KV, self.max_context)
        self.states = {name: self._zeros(name, self.capacity) for name in self.state_layout}

    def _zeros(self, name: str, capacity: int):
        shape, dtype = self.state_layout[name]
        return self.runtime.NDArray(np.zeros([capacity if d == -1 else d for d in shape], dtype))

    def _grow(self, length: int) -> None:
        while self.capacity < length:
            capacity = min(self.capacity * 2, self.max_context)
            for name in (self.key_name, self.value_name):
                old = self.states[name].numpy()
                grown = np.zeros([*old.shape[:3], capacity, old.shape[4]], old.dtype)
                grown[:, :, :, : old.shape[3]] = old
                self.states[name] = self.runtime.NDArray(grown)
            self.capacity = capacity

    def set_image(self, patches: np.ndarray | None) -> None:
        """The 4 static inputs, set once per image: the encoder asset's fp16 rows, or "no image"."""
        desc = self.main.desc
        shapes = {n: (list(desc.input_descriptor(n).shape), np.dtype(desc.input_descriptor(n).dtype))
                  for n in self.static_inputs}
        if patches is None:
            self.images = {n: np.full(s, NO_IMAGE_START if n == "rope_shift_start" else 0, dt)
                           for n, (s, dt) in shapes.items()}
            return
        out = self.call(self.encoder, {"patches": patches.astype(np.float16)}, {})
        self.images = {"image_embeds": out["image_embeds"].astype(shapes["image_embeds"][1]),
                       "deepstack_embeds": out["deepstack_embeds"].astype(shapes["deepstack_embeds"][1])}

    def image_prompt(self, ids: list[int], patches: np.ndarray) -> list[int]:
        """The host side of one image: placeholders -> vocab + slot, the rope shift of the tokens after it."""
        vision = self.meta["vision"]
        tokens, grid = vision["tokens_per_image"], vision["merged_grid"]
        start = ids.index(vision["image_token_id"])
        out = list(ids[:start]) + [self.language["vocab_size"] + k for k in range(tokens)] + list(ids[start + 1:])
        self.set_image(patches)
        self.images["rope_shift_start"] = np.array([start + tokens], np.int32)
        self.images["rope_shift_amount"] = np.array([tokens - max(grid)], np.int32)
        return out

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        tokens, token = [], None
        for position in range(len(prompt) + max_tokens - 1):
            token = prompt[position] if position < len(prompt) else token
            self._grow(position + 1)
            inputs = {"input_ids": np.array([[token]], np.int32),
                      "position_ids": np.arange(position + 1, dtype=np.int32).reshape(1, -1), **self.images}
            logits = self.call(self.main, inputs, self.states)["logits"]
            if position >= len(prompt) - 1:
                token = int(logits.reshape(-1).argmax())
                tokens.append(token)
        return tokens


def classify(desc, names: list[str]) -> dict[str, str]:
    """Apple's state heuristic: two states are both KV; else dynamic -> KV, *cache*/*kv* -> sliding, else fixed."""
    if len(names) == 2:
        return dict.fromkeys(names, "kv_cache")
    kinds = {}
    for name in names:
        if -1 in list(desc.state_descriptor(name).shape):
            kinds[name] = "kv_cache"
        else:
            kinds[name] = "sliding_cache" if "cache" in name.lower() or "kv" in name.lower() else "fixed"
    return kinds


def prefill_chunk_sizes(count: int, width: int) -> list[int]:
    """Balanced chunks over all but the held-back last token, none wider than `width`."""
    total = max(0, count - 1)
    if not total:
        return []
    n = -(-total // max(1, width))
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


class AppleMainEngine(Host):
    """Apple's pipelined engine on main (see the module docstring). Text bundles only: its VLM path is
    another engine."""

    def __init__(self, bundle: Path, cache: Path):
        super().__init__(bundle, cache)
        self.main = self.function(self.model, self.language.get("function_map", {}).get("main", ["main"])[0])
        desc = self.main.desc
        if len(desc.input_names) != 2:
            raise HostError(f"Expected 2 inputs, got {len(desc.input_names)}: {list(desc.input_names)}")
        names = list(desc.state_names)
        if not 2 <= len(names) <= 4:
            raise HostError(f"Expected 2–4 states, got {len(names)}: {names}")
        kinds = classify(desc, names)
        growing = [n for n in names if kinds[n] == "kv_cache"]
        if len(growing) < 2:
            raise HostError(f"Expected at least 2 growing KV cache states, found {len(growing)}")
        self.key_name, self.value_name = growing[:2]
        self.state_layout = {name: self.layout(desc, name) for name in names}
        self.prefill = self.function(self.model, "prefill")
        if self.prefill is not None:
            p = self.prefill.desc
            if list(p.input_names) != list(desc.input_names) or set(p.state_names) != set(names) or list(p.output_names):
                raise HostError("'prefill' graph does not match 'main' (inputs, states, or declares outputs)")
        self.chunk = int(self.language.get("prefill_chunk_size") or APPLE_DEFAULT_CHUNK)
        self.ids_name, self.positions_name = desc.input_names[0], desc.input_names[1]

    def _states(self, capacity: int) -> dict:
        return {name: self.runtime.NDArray(np.zeros([capacity if d == -1 else d for d in shape], dtype))
                for name, (shape, dtype) in self.state_layout.items()}

    def _inputs(self, tokens: list[int], processed: int) -> dict[str, np.ndarray]:
        return {self.ids_name: np.array([tokens], np.int32),
                self.positions_name: np.arange(processed + len(tokens), dtype=np.int32).reshape(1, -1)}

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        capacity = min(APPLE_MIN_KV, self.max_context)
        while capacity < min(len(prompt) + max_tokens, self.max_context):  # pre-grown for the whole request
            capacity = min(capacity * 2, self.max_context)
        states, processed = self._states(capacity), 0
        sizes = prefill_chunk_sizes(len(prompt), self.chunk) if self.prefill is not None else []
        for size in sizes:
            self.call(self.prefill, self._inputs(prompt[processed : processed + size], processed), states)
            processed += size
        rest = prompt[processed:]  # without a prefill function: the whole prompt through main at once
        tokens = []
        while len(tokens) < max_tokens:
            logits = self.call(self.main, self._inputs(rest, processed), states)["logits"]
            processed += len(rest)
            tokens.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
            rest = tokens[-1:]
        return tokens
