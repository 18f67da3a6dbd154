"""Export the one-token decode step to an Apple Core AI `.aimodel` (torch.export -> coreai-torch).

The exported `main` function follows the seed engine's run contract:

- inputs  `input_ids` [1, 1] int32 and `position_ids` [1, t + 1] int32, the ramp 0..t whose last entry
  is the position of the token (the seed's contract; the ramp's length is a dynamic dim, which the
  Linux runtime accepts, so the same file serves Apple's engine unchanged). `ramp=False` exports a
  static [1, 1] position instead.
- outputs `logits` [1, 1, V] fp32 and `next_token` [1, 1] int32 (the argmax, so the host never needs
  the logits in greedy decode), named explicitly because the runtime's output order is not stable.
- with `vision` (a VLM bundle's metadata section, for an image-prompt graph), four more inputs, set
  once per prompt by the host (`ImageContext`): `image_embeds` [M * T, H] fp32, `deepstack_embeds`
  [n_deepstack * M * T, H] fp32 (zero rows for Qwen3.5), `rope_shift_start` and `rope_shift_amount`
  [M] int32, for up to M = max_images images of T tokens. The "no images" values make it the text model.
- states `keyCache`, `valueCache` [n_full, 1, kv_heads, capacity, head_dim] and `convState`,
  `recState` (fp32), updated in place by the graph; the caller zero-fills them on reset.

The KV capacity is fixed at export time and positions past the current one are masked: a KV cache of
dynamic length updated in place fails to lower on the Linux runtime ("index_put currently only
supports dynamic batch dimension"), so a bundle is exported for the context it will serve.

int8 layers (`Linear` with qweight + scales) become Core AI blockwise-dequantised constants
(`coreai.blockwise_shift_scale`), so the asset stores 1 byte per weight plus the scales.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..bundle.coreai import COMPILED_FILE, compile_asset, import_coreai_torch
from ..bundle.format import IMAGE_INPUT_NAMES, STATE_NAMES, STEP_INPUT_NAMES, STEP_OUTPUT_NAMES
from ..errors import LmbundleError
from ..models.image_prompt import ImageContext
from ..models.ops import StepOps
from ..quiet import python_stdout_filtered

COMPILED_NAME = "main-unspecialized.odix"  # where the Linux runtime looks for a compiled program in the folder


class CoreAIStepOps(StepOps):
    """The reference ops, with int8 linears as Core AI blockwise constants: w = qweight * scale per block
    of input columns. The scales are cast to the compute dtype first (the op's output dtype is its
    scale's); the converter folds that cast, so the asset holds int8 weights + scales and the runtime
    dequantises."""

    def int8_matmul(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        weight = torch.ops.coreai.constexpr_blockwise_shift_scale(qweight, scales.to(x.dtype))
        return torch.nn.functional.linear(x, weight)


class StepGraph(nn.Module):
    """The step as torch.export sees it: the decode state lives in buffers named per the contract,
    so the in-place updates of `model.step` become Core AI states."""

    def __init__(self, model: nn.Module, capacity: int, dtype: torch.dtype, ramp: bool,
                 images: ImageContext | None = None):
        super().__init__()
        self.model, self.capacity, self.ramp = model, capacity, ramp
        self.grid = images.grid if images is not None else None
        state = model.new_state(capacity, device="cpu", dtype=dtype)
        self._state_type = type(state)
        self._empty = {}  # a pure-attention decoder (Qwen3-VL) has no GDN state: no Core AI state for it
        for field in dataclasses.fields(state):
            tensor = getattr(state, field.name)
            if tensor.numel():
                self.register_buffer(STATE_NAMES[field.name], tensor)
            else:
                self._empty[field.name] = tensor

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
        deepstack_embeds: torch.Tensor | None = None, rope_shift_start: torch.Tensor | None = None,
        rope_shift_amount: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image inputs are given only when the graph was built with an image context."""
        position = position_ids[0, -1:].long()
        state = self._state_type(**{field: self._empty[field] if field in self._empty else getattr(self, name)
                                    for field, name in STATE_NAMES.items()})
        if self.grid is not None:
            self.model.set_images(ImageContext(image_embeds, deepstack_embeds, rope_shift_start, rope_shift_amount,
                                               grid=self.grid))
        try:
            logits = self.model.step(input_ids, position, state, self.capacity)
        finally:
            if self.grid is not None:
                self.model.set_images(None)
        return logits, logits.argmax(dim=-1).to(torch.int32)


def image_context_for(model: nn.Module, vision: dict | None) -> ImageContext | None:
    """The export's example image inputs ("no images", fp32) from a bundle's vision section; None
    for a text-only bundle or a graph without image prompts."""
    if vision is None or not hasattr(model, "set_images"):
        return None
    return ImageContext.empty(vision["out_hidden_size"], vision["max_images"], tuple(vision["merged_grid"]),
                              vision["num_deepstack"])


def _state_order(exported: torch.export.ExportedProgram, expected: list[str]) -> list[str]:
    """The state buffers in the order the converter numbers states (the program's input order)."""
    mutated = set(exported.graph_signature.buffers_to_mutate.values())
    order = [spec.target for spec in exported.graph_signature.input_specs if spec.target in mutated]
    if sorted(order) != sorted(expected):
        raise LmbundleError(f"the step graph mutates {order}, expected exactly {sorted(expected)}")
    return order


@dataclass
class ExportReport:
    path: Path
    seconds: float
    bytecode_bytes: int
    compiled: bool


def export_aimodel(
    model: nn.Module,
    capacity: int,
    out_path: Path | str,
    *,
    dtype: torch.dtype | None = None,
    ramp: bool = True,
    compile_for_linux: bool = False,
    vision: dict | None = None,
) -> ExportReport:
    """Write `out_path` (a `.aimodel` folder) holding the step of `model` at a fixed KV `capacity`.

    `dtype` is the activation/state dtype (default: the embedding's). `compile_for_linux` also stores
    the compiled `main-unspecialized.odix`, which the Linux runtime needs to load the folder by path;
    it roughly doubles the folder, so bundles leave it out and `CoreAIBackend` compiles into its cache.
    `vision` (the bundle's vision section) adds the image inputs to an image-prompt graph.
    """
    coreai_torch = import_coreai_torch()
    out_path = Path(out_path)
    if out_path.suffix != ".aimodel":
        raise LmbundleError(f"{out_path}: a Core AI asset must end in .aimodel")
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    start = time.perf_counter()
    images = image_context_for(model, vision)
    graph = StepGraph(model, capacity, dtype, ramp, images).eval()
    ids = torch.zeros(1, 1, dtype=torch.int32)
    positions = torch.arange(2 if ramp else 1, dtype=torch.int32).view(1, -1)
    image_inputs = tuple(images.tensors().values()) if images is not None else ()
    input_names = [*STEP_INPUT_NAMES, *(IMAGE_INPUT_NAMES if images is not None else ())]
    ramp_dim = {1: torch.export.Dim("positions", min=1, max=capacity)}
    dynamic = ({}, ramp_dim, *({} for _ in image_inputs)) if ramp else None

    previous, model.ops = model.ops, CoreAIStepOps()  # never a device kernel in the graph
    try:
        with torch.no_grad():
            exported = torch.export.export(graph, (ids, positions, *image_inputs), dynamic_shapes=dynamic, strict=False)
        exported = exported.run_decompositions(coreai_torch.get_decomp_table())
    finally:
        model.ops = previous

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_exported_program(
        exported, input_names=input_names, output_names=list(STEP_OUTPUT_NAMES),
        state_names=_state_order(exported, [n for n in STATE_NAMES.values() if n in graph._buffers]),
    )
    with python_stdout_filtered():  # its "converting 1 program(s)" line (lmbundle/quiet.py)
        program = converter.to_coreai()
    program.save_asset(out_path)
    del exported, converter, program
    if compile_for_linux:
        compile_asset(out_path, out_path)
        (out_path / COMPILED_FILE).rename(out_path / COMPILED_NAME)
        (out_path / "main-universal.dbginfo").unlink(missing_ok=True)
    return ExportReport(
        path=out_path,
        seconds=time.perf_counter() - start,
        bytecode_bytes=(out_path / "main.mlirb").stat().st_size,
        compiled=compile_for_linux,
    )
