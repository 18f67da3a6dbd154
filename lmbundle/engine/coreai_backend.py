"""Run an exported `.aimodel` step with Apple's Core AI runtime (coreai-core).

On Linux the runtime is a CPU reference interpreter: it proves that the shipped file computes the
right tokens, not how fast a Mac runs it. It loads the compiled program from the shared compile cache
(`bundle/coreai.py`).

Steps are enqueued on the runtime's event loop (a thread of ours) and run in order: `step` returns a
handle at once, so the engine can enqueue step n + 1, feeding it step n's handle as its token (the
token then never visits the host), before it reads step n's token.

KV states of dynamic length are grown as Apple's pipelined engine grows them (class docstring); prompts
go as Apple's engine sends them: all but the last token through the `prefill` function in balanced
chunks of at most the bundle's `prefill_chunk_size`, then `main` steps.

A VLM asset also takes the four image inputs of an `ImageContext` on every step; the backend holds
them as runtime arrays, the "no images" values until `set_images` hands it a prompt's context.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from ..bundle.coreai import compiled_entry, discard_entry, import_runtime
from ..bundle.format import (
    IMAGE_INPUT_NAMES,
    MAIN_FUNCTION,
    PREFILL_CHUNK,
    PREFILL_FUNCTION,
    STATE_NAMES,
    STEP_INPUT_NAMES,
)
from ..errors import LmbundleError
from ..models.image_prompt import NO_SHIFT_START
from ..models.state import State
from ..quiet import native_stderr_filtered
from .sampling import Sampling, sample

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}
INITIAL_CAPACITY = 256  # Apple's engine: KV states start at min(256, max_context_length) slots
KV_FIRST = (STATE_NAMES["key"], STATE_NAMES["value"])


def prefill_chunks(count: int, width: int) -> list[int]:
    """Apple's chunk plan for `count` prompt tokens (the last one held back for `main`): as many chunks
    as `width`-wide ones would take, balanced to within one token of each other."""
    total = max(0, count - 1)
    if not total:
        return []
    chunks = -(-total // max(1, width))
    return [total // chunks + (1 if i < total % chunks else 0) for i in range(chunks)]


def _asset_of(source, verify: bool) -> Path:
    """The `.aimodel` of a bundle (its `main` asset) or a path to one. With `verify`, the asset's small
    files (main.hash above all) are checked against the bundle's record; the bytecode is checked against
    main.hash on every load, a cache hit included (hashed once per change of the file, then a stat)."""
    if not hasattr(source, "aimodel_path"):
        return Path(source)
    aimodel = source.aimodel_path
    if aimodel is None:
        raise LmbundleError(f"{source.path}: this bundle has no .aimodel (convert with --backend all or coreai)")
    recorded = source.info.get("files", {})
    small = [rel for rel in recorded if rel.startswith(f"{aimodel.name}/") and not rel.endswith(".mlirb")]
    if verify and small:
        source.verify(small)
    return aimodel


class CoreAIStep:
    """One enqueued step: `done` completes when it ran; `outputs` is filled in by the loop thread."""

    def __init__(self) -> None:
        self.done: Future | None = None
        self.outputs: dict | None = None


class CoreAIBackend:
    """The engine's `Backend` (backend.py; not resumable) on a Core AI asset: a bundle (its `main`
    asset) or a bare `.aimodel` folder.

    KV states: an asset with dynamic KV states (sequence dim -1) gets them grown as Apple's pipelined
    engine grows them: `INITIAL_CAPACITY` slots (at most the context), doubled by copying the written
    prefix into a longer zeroed buffer whenever a call would reach past the end, up to `max_context`.
    Every call is given states of at least position + 1 slots (a shorter one is written nowhere,
    silently), K and V always the same length. An old asset with fixed KV states keeps its capacity.
    """

    name = "coreai"
    resumable = False  # its state lives in the runtime: every prompt starts over

    def __init__(self, source, cache: Path | None = None, verify: bool = True, max_context: int | None = None,
                 prefill_chunk: int | None = None):
        _, runtime = import_runtime()
        self._runtime = runtime
        self.aimodel = _asset_of(source, verify)
        self.compiled, self.cache_hit = compiled_entry(self.aimodel, cache)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coreai-steps", daemon=True)
        self._thread.start()
        self._lock = asyncio.Lock()
        try:
            self._function, self._prefill = self._call(self._load()).result()
        except RuntimeError:
            # A cache entry that verifies but does not load is rebuilt once; the asset decides after that.
            discard_entry(self.compiled)
            self.compiled, self.cache_hit = compiled_entry(self.aimodel, cache)
            try:
                self._function, self._prefill = self._call(self._load()).result()
            except RuntimeError as exc:
                self.close()
                raise LmbundleError(f"{self.aimodel}: the Core AI runtime could not load it ({exc})") from exc
        desc = self._function.desc
        self._check_contract(desc)
        self.ramp = desc.input_descriptor("position_ids").shape[1] == -1
        self._state_layout = {
            name: (tuple(desc.state_descriptor(name).shape), np.dtype(desc.state_descriptor(name).dtype))
            for name in desc.state_names
        }
        self._kv_names = [name for name in (STATE_NAMES["key"], STATE_NAMES["value"]) if name in self._state_layout]
        kv_length = self._state_layout[STATE_NAMES["key"]][0][3]
        self.dynamic_kv = kv_length == -1
        if max_context is None:
            max_context = source.max_context if hasattr(source, "max_context") else 1 << 20
        self.max_context = max_context if self.dynamic_kv else min(max_context, kv_length)
        if prefill_chunk is None:
            language = source.metadata["language"] if hasattr(source, "metadata") else {}
            prefill_chunk = int(language.get("prefill_chunk_size", PREFILL_CHUNK))
        self.prefill_chunk = prefill_chunk if self._prefill is not None else 0
        self.capacity = 0  # KV slots of the states the runtime holds now
        self.states: dict = {}
        self._image_layout = {
            name: (tuple(desc.input_descriptor(name).shape), np.dtype(desc.input_descriptor(name).dtype))
            for name in IMAGE_INPUT_NAMES if name in desc.input_names
        }
        self.takes_images = bool(self._image_layout)
        self._images: dict = {}
        self.reset()
        self.set_images(None)

    async def _load(self):
        model = await self._runtime.AIModel.load(self.compiled)
        with native_stderr_filtered():  # the runtime's "ODIE [default]: Loading function ..." (lmbundle/quiet.py)
            prefill = model.load_function(PREFILL_FUNCTION) if PREFILL_FUNCTION in model.function_names else None
            return model.load_function(MAIN_FUNCTION), prefill

    def _check_contract(self, desc) -> None:
        """The layout the hosts bind (docs/coreai.md): KV states first, and a `prefill` function with
        `main`'s inputs and states and no outputs. An asset from an older lmbundle is refused."""
        states = list(desc.state_names)
        problem = None
        if states[: len(KV_FIRST)] != list(KV_FIRST):
            problem = f"its states are {states}; the hosts bind {', '.join(KV_FIRST)} first"
        elif self._prefill is not None:
            prefill = self._prefill.desc
            if list(prefill.input_names) != list(desc.input_names) or set(prefill.state_names) != set(states) \
                    or list(prefill.output_names):
                problem = (f"its `{PREFILL_FUNCTION}` function has outputs {list(prefill.output_names)} or other "
                           "inputs and states than `main`")
        if problem:
            self.close()
            raise LmbundleError(f"{self.aimodel}: an older lmbundle wrote this asset ({problem}); "
                                "convert the checkpoint again")

    def _call(self, coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _set_states(self, arrays: dict[str, np.ndarray]) -> None:
        async with self._lock:  # after the steps in flight
            self.states = {name: self._runtime.NDArray(array) for name, array in arrays.items()}

    def _shape(self, name: str, capacity: int) -> tuple[int, ...]:
        shape = self._state_layout[name][0]
        return tuple(capacity if (name in self._kv_names and i == 3) else n for i, n in enumerate(shape))

    def _room_for(self, length: int) -> int:
        """The KV length Apple's engine would hold for `length` positions: the current length (at first
        min(256, max_context)) doubled until it fits, at most max_context."""
        if length > self.max_context:
            kind = "context" if self.dynamic_kv else "KV capacity"
            raise LmbundleError(f"{length} positions do not fit the asset's {kind} of {self.max_context}")
        if not self.dynamic_kv:
            return self.max_context
        capacity = self.capacity or min(INITIAL_CAPACITY, self.max_context)
        while capacity < length:
            capacity = min(capacity * 2, self.max_context)
        return capacity

    def reset(self, length: int = 0) -> None:
        """Fresh zeroed states with room for `length` positions (Apple's engine pre-grows to prompt + max
        tokens). Built from numpy zeros: memory from `NDArray.from_descriptor` is uninitialised and its
        `.numpy()` is a copy, so it cannot be zeroed in place."""
        self.capacity = 0
        capacity = self._room_for(max(length, 1))
        zeros = {name: np.zeros(self._shape(name, capacity), dtype) for name, (_, dtype) in self._state_layout.items()}
        self._call(self._set_states(zeros)).result()
        self.capacity = capacity

    async def _grow(self, capacity: int) -> None:
        async with self._lock:  # after the steps in flight: they wrote the prefix that is copied
            for name in self._kv_names:
                old = self.states[name].numpy()
                grown = np.zeros(self._shape(name, capacity), old.dtype)
                grown[:, :, :, : old.shape[3]] = old
                self.states[name] = self._runtime.NDArray(grown)

    def grow(self, length: int) -> None:
        """Make the KV states hold at least `length` positions (doubling, the written prefix copied)."""
        capacity = self._room_for(length)
        if capacity > self.capacity:
            self._call(self._grow(capacity))  # queued in order with the steps
            self.capacity = capacity

    async def _set_images(self, arrays: dict[str, np.ndarray]) -> None:
        async with self._lock:  # after the steps in flight, which keep the inputs they were given
            self._images = {name: self._runtime.NDArray(array) for name, array in arrays.items()}

    def set_images(self, images=None) -> None:
        """The image inputs of the following steps: an `ImageContext` (its tensors are copied) or None
        for "no images". A text-only asset takes none."""
        if not self.takes_images:
            if images is not None:
                raise LmbundleError(f"{self.aimodel}: this asset has no image inputs")
            return
        arrays = {}
        for name, (shape, dtype) in self._image_layout.items():
            if images is None:
                fill = NO_SHIFT_START if name == "rope_shift_start" else 0
                arrays[name] = np.full(shape, fill, dtype)
            else:
                tensor = images.tensors()[name].detach().cpu()
                if tuple(tensor.shape) != shape:
                    raise LmbundleError(f"{self.aimodel}: image input {name} is {tuple(tensor.shape)}, "
                                        f"the asset takes {shape}")
                arrays[name] = np.array(tensor.numpy(), dtype=dtype, copy=True)
        self._call(self._set_images(arrays)).result()

    def load_state(self, write) -> None:
        """Let `write(state)` fill a torch `State` (the gates seed it from the oracle's cache); it becomes
        the runtime's state, at the current KV length."""
        tensors = {field: torch.zeros(*self._shape(name, self.capacity),
                                      dtype=_TORCH_DTYPES[self._state_layout[name][1]])
                   if name in self._state_layout else torch.zeros(0)
                   for field, name in STATE_NAMES.items()}
        write(State(**tensors))
        arrays = {STATE_NAMES[field]: tensor.numpy() for field, tensor in tensors.items()
                  if STATE_NAMES[field] in self._state_layout}
        self._call(self._set_states(arrays)).result()

    def _position_ids(self, position: int, count: int = 1) -> np.ndarray:
        """The ramp 0..position + count - 1 (or the [1, 1] position of a static-position asset), after
        making the KV states long enough for it."""
        self.grow(position + count)
        if self.ramp:
            return np.arange(position + count, dtype=np.int32).reshape(1, -1)
        return np.array([[position]], dtype=np.int32)

    async def _run(self, handle: CoreAIStep, function, token: int | CoreAIStep | np.ndarray,
                   position_ids: np.ndarray, after: list[Future] = ()) -> None:
        NDArray = self._runtime.NDArray
        async with self._lock:
            if any(f.done() and f.exception() is not None for f in after):
                raise RuntimeError("a prefill chunk before this step failed")
            if isinstance(token, CoreAIStep):
                if token.outputs is None:
                    raise RuntimeError("the step that feeds this one failed")
                ids = token.outputs["next_token"]
            elif isinstance(token, np.ndarray):
                ids = NDArray(token)
            else:
                ids = NDArray(np.array([[token]], dtype=np.int32))
            inputs = dict(zip(STEP_INPUT_NAMES, (ids, NDArray(position_ids)))) | self._images
            handle.outputs = await function(inputs, self.states)

    def step(self, token: int | torch.Tensor | CoreAIStep, position: int, with_head: bool = True) -> CoreAIStep:
        """Enqueue one step: `token` is an id ([1, 1] tensor or int) or the handle of the step whose
        in-graph argmax feeds this one (the greedy pipeline: the token stays in the runtime). The asset
        always computes the head (`with_head` is the Backend protocol's)."""
        if isinstance(token, torch.Tensor):
            token = int(token.item())
        handle = CoreAIStep()
        handle.done = self._call(self._run(handle, self._function, token, self._position_ids(position)))
        return handle

    def prefill(self, ids: list[int], chunk: int = 0, start: int = 0, with_head: bool = True) -> CoreAIStep:
        """Prompt tokens at positions start, start+1, ...: with `chunk` > 0 as Apple's engine sends them
        when the asset has a `prefill` function: all but the last token through it in balanced chunks of
        at most `prefill_chunk` (it has no outputs), then the last token through `main`; else S=1 steps
        through `main`. The asset always computes the head (`with_head` is the Backend protocol's)."""
        sizes = prefill_chunks(len(ids), self.prefill_chunk) if chunk and self._prefill is not None else []
        chunks, done = [], 0
        for size in sizes:
            tokens = np.array([ids[done : done + size]], dtype=np.int32)
            chunks.append(self._call(self._run(CoreAIStep(), self._prefill, tokens,
                                               self._position_ids(start + done, size))))
            done += size
        handle = None
        for at in range(done, len(ids)):
            handle = CoreAIStep()
            handle.done = self._call(self._run(handle, self._function, ids[at], self._position_ids(start + at),
                                               chunks))
        return handle

    def next_token(self, handle: CoreAIStep, sampling: Sampling, generator) -> CoreAIStep | torch.Tensor:
        """Greedy: the step itself (its `next_token` output feeds the next step); else sampled on the host."""
        if sampling.greedy and not sampling.processors:
            return handle
        return sample(self.read_logits(handle), sampling, generator)

    def read_token(self, token: CoreAIStep | torch.Tensor | int) -> int:
        if isinstance(token, CoreAIStep):
            token.done.result()
            return int(token.outputs["next_token"].numpy().reshape(-1)[0])
        return int(token.item()) if isinstance(token, torch.Tensor) else int(token)

    def read_logits(self, handle: CoreAIStep) -> torch.Tensor:
        """Logits [1, 1, V] as fp32 (a copy: the runtime owns its output buffers; the asset's are fp16,
        as Apple's pipelined engine requires)."""
        handle.done.result()
        return torch.from_numpy(np.array(handle.outputs["logits"].numpy(), dtype=np.float32, copy=True))

    def logits(self, handle: CoreAIStep) -> torch.Tensor:
        return self.read_logits(handle).reshape(-1)

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "CoreAIBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
