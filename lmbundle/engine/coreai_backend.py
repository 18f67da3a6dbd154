"""Run an exported `.aimodel` step with Apple's Core AI runtime (coreai-core).

On Linux the runtime is a CPU reference interpreter: it proves that the shipped file computes the
right tokens, not how fast a Mac runs it. It loads the compiled program from the shared compile cache
(`bundle/coreai.py`).

Steps are enqueued on the runtime's event loop (a thread of ours) and run in order: `step` returns a
handle at once, so the engine can enqueue step n + 1, feeding it step n's handle as its token (the
token then never visits the host), before it reads step n's token.

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
from ..bundle.format import IMAGE_INPUT_NAMES, STATE_NAMES
from ..errors import LmbundleError
from ..models.image_prompt import NO_SHIFT_START
from ..models.state import State
from ..quiet import native_stderr_filtered
from .sampling import Sampling, sample

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def _asset_of(source, verify: bool) -> Path:
    """The `.aimodel` of a bundle (its `main` asset) or a path to one. With `verify`, the asset's small
    files (main.hash above all) are checked against the bundle's record; the bytecode is checked against
    main.hash whenever it is compiled, so a cache hit never reads the gigabytes again."""
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
    """The engine's backend interface (reset / prefill / step / next_token / read_token / logits) on a
    Core AI asset: a bundle (its `main` asset) or a bare `.aimodel` folder."""

    name = "coreai"
    resumable = False  # its state lives in the runtime: every prompt starts over

    def __init__(self, source, cache: Path | None = None, verify: bool = True):
        _, runtime = import_runtime()
        self._runtime = runtime
        self.aimodel = _asset_of(source, verify)
        self.compiled, self.cache_hit = compiled_entry(self.aimodel, cache)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coreai-steps", daemon=True)
        self._thread.start()
        self._lock = asyncio.Lock()
        try:
            self._function = self._call(self._load()).result()
        except RuntimeError:
            # A cache entry that verifies but does not load is rebuilt once; the asset decides after that.
            discard_entry(self.compiled)
            self.compiled, self.cache_hit = compiled_entry(self.aimodel, cache)
            try:
                self._function = self._call(self._load()).result()
            except RuntimeError as exc:
                self.close()
                raise LmbundleError(f"{self.aimodel}: the Core AI runtime could not load it ({exc})") from exc
        desc = self._function.desc
        self.ramp = desc.input_descriptor("position_ids").shape[1] == -1
        self._state_layout = {
            name: (tuple(desc.state_descriptor(name).shape), np.dtype(desc.state_descriptor(name).dtype))
            for name in desc.state_names
        }
        self.states: dict = {}
        self.capacity = int(desc.state_descriptor("keyCache").shape[3])
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
        with native_stderr_filtered():  # the runtime's "ODIE [default]: Loading function 'main'" (lmbundle/quiet.py)
            return model.load_function("main")

    def _call(self, coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _set_states(self, arrays: dict[str, np.ndarray]) -> None:
        async with self._lock:  # after the steps in flight
            self.states = {name: self._runtime.NDArray(array) for name, array in arrays.items()}

    def reset(self, length: int = 0) -> None:
        """Fresh zeroed states with room for `length` positions. Built from numpy zeros: memory from
        `NDArray.from_descriptor` is uninitialised and its `.numpy()` is a copy, so it cannot be zeroed in place."""
        self.grow(length)
        zeros = {name: np.zeros(shape, dtype) for name, (shape, dtype) in self._state_layout.items()}
        self._call(self._set_states(zeros)).result()

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

    def grow(self, length: int) -> None:
        """The KV capacity is fixed at export: a longer context is a user error, not a resize."""
        if length > self.capacity:
            raise LmbundleError(f"{length} positions do not fit the asset's KV capacity {self.capacity} "
                                "(export it with a larger capacity)")

    def load_state(self, write) -> None:
        """Let `write(state)` fill a torch `State` (the gates seed it from the oracle's cache); it becomes
        the runtime's state."""
        tensors = {field: torch.zeros(*self._state_layout[name][0], dtype=_TORCH_DTYPES[self._state_layout[name][1]])
                   if name in self._state_layout else torch.zeros(0)
                   for field, name in STATE_NAMES.items()}
        write(State(**tensors))
        arrays = {STATE_NAMES[field]: tensor.numpy() for field, tensor in tensors.items()
                  if STATE_NAMES[field] in self._state_layout}
        self._call(self._set_states(arrays)).result()

    def _position_ids(self, position: int) -> np.ndarray:
        if position >= self.capacity:
            raise LmbundleError(f"position {position} is past the asset's KV capacity {self.capacity}")
        if self.ramp:
            return np.arange(position + 1, dtype=np.int32).reshape(1, -1)
        return np.array([[position]], dtype=np.int32)

    async def _step(self, handle: CoreAIStep, token: int | CoreAIStep, position_ids: np.ndarray) -> None:
        NDArray = self._runtime.NDArray
        async with self._lock:
            if isinstance(token, CoreAIStep):
                if token.outputs is None:
                    raise RuntimeError("the step that feeds this one failed")
                ids = token.outputs["next_token"]
            else:
                ids = NDArray(np.array([[token]], dtype=np.int32))
            inputs = {"input_ids": ids, "position_ids": NDArray(position_ids), **self._images}
            handle.outputs = await self._function(inputs, self.states)

    def step(self, token: int | torch.Tensor | CoreAIStep, position: int) -> CoreAIStep:
        """Enqueue one step: `token` is an id ([1, 1] tensor or int) or the handle of the step whose
        in-graph argmax feeds this one (the greedy pipeline: the token stays in the runtime)."""
        if isinstance(token, torch.Tensor):
            token = int(token.item())
        handle = CoreAIStep()
        handle.done = self._call(self._step(handle, token, self._position_ids(position)))
        return handle

    def prefill(self, ids: list[int], chunk: int = 0) -> CoreAIStep:
        """The prompt as S=1 steps (the asset has one `main` function; `chunk` does not apply)."""
        handle = None
        for position, token in enumerate(ids):
            handle = self.step(token, position)
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
        """Logits [1, 1, V] fp32 (a copy: the runtime owns its output buffers)."""
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

