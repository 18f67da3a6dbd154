"""Export the decoder to an Apple Core AI `.aimodel` (torch.export -> coreai-torch), in the shape
Apple's `coreai-pipelined` engine loads (docs/coreai.md has the contract table).

Two entry points share the weights and the states:
- `main`, the one-token step: inputs `input_ids` [1, 1] int32 and `position_ids` [1, n] int32, the ramp
  0..t (dynamic length; the step's position is its last entry); outputs `logits` [1, 1, V] fp16 (the
  dtype Apple's engine samples from) and `next_token` [1, 1] int32 (the in-graph argmax of the fp32
  logits, so greedy decode never reads logits), named explicitly because the runtime's output order is
  not stable.
- `prefill`, `PREFILL_CHUNK` tokens through the graph's chunked path (the WY gated-delta chunk), no head:
  it only advances the states (output `hidden`, the last token's residual stream).
- with `vision` (a VLM bundle's metadata section), both take four more inputs set once per prompt by the
  host (`ImageContext`): `image_embeds` [M * T, H] fp32, `deepstack_embeds` [n_deepstack * M * T, H] fp32
  (zero rows for Qwen3.5), `rope_shift_start` and `rope_shift_amount` [M] int32.
- states `convState`, `recState` (fixed size) and `keyCache`, `valueCache` [n_full, 1, kv_heads, -1,
  head_dim]: the KV sequence length is dynamic, the host grows the arrays (256, doubling) and the graph
  masks the slots past the position. `kv="fixed"` exports the old fixed-capacity layout.

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
from ..models.state import GROWING_STATES
from ..quiet import python_stdout_filtered

COMPILED_NAME = "main-unspecialized.odix"  # where the Linux runtime looks for a compiled program in the folder
PREFILL_FUNCTION = "prefill"
PREFILL_OUTPUT_NAMES = ["hidden"]
LOGITS_DTYPE = torch.float16  # Apple's pipelined engine takes only fp16 logits (its GPU sampler reads them)
PREFILL_CHUNK = 64
KV_EXAMPLE = 37  # the traced KV length: distinct from every static size, so no dim is specialised to it


class CoreAIStepOps(StepOps):
    """The reference ops, with int8 linears as Core AI blockwise constants: w = qweight * scale per block
    of input columns. The scales are cast to the compute dtype first (the op's output dtype is its
    scale's); the converter folds that cast, so the asset holds int8 weights + scales and the runtime
    dequantises."""

    def int8_matmul(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        weight = torch.ops.coreai.constexpr_blockwise_shift_scale(qweight, scales.to(x.dtype))
        return torch.nn.functional.linear(x, weight)


class DecoderGraph(nn.Module):
    """A decoder entry point as torch.export sees it.

    `convState`/`recState` (fixed size) are buffers; `keyCache`/`valueCache` are forward arguments the
    graph mutates in place, so coreai-torch makes all four runtime states ("buffers, then mutated
    inputs") and the KV pair can take a dynamic sequence length (`fixed_capacity=None`). With a
    `fixed_capacity` the KV pair are buffers of that length (the old layout, kept for comparison).

    `chunk` is the number of tokens a call takes: 1 for `main` (the step: logits fp16 [1, 1, V] and the
    in-graph argmax `next_token`), q > 1 for `prefill` (the chunked path, no head: it only advances the
    states and returns the last token's residual stream).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, images: ImageContext | None = None,
                 chunk: int = 1, fixed_capacity: int | None = None):
        super().__init__()
        self.model, self.chunk, self.fixed_capacity = model, chunk, fixed_capacity
        self.grid = images.grid if images is not None else None
        state = model.new_state(fixed_capacity or 1, device="cpu", dtype=dtype)
        self._state_type = type(state)
        self._empty = {}  # a pure-attention decoder (Qwen3-VL) has no GDN state: no Core AI state for it
        self.kv_example = {}
        for field in dataclasses.fields(state):
            tensor = getattr(state, field.name)
            if field.name in GROWING_STATES and fixed_capacity is None:
                self.kv_example[field.name] = tensor
            elif tensor.numel():
                self.register_buffer(STATE_NAMES[field.name], tensor)
            else:
                self._empty[field.name] = tensor

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor):
        """rest: the four image inputs when the graph was built with an image context, then keyCache and
        valueCache when they are dynamic."""
        kv = dict(zip(GROWING_STATES, rest[len(rest) - 2:])) if self.fixed_capacity is None else {}
        image_inputs = rest[: len(rest) - len(kv)]
        tensors = {field: kv[field] if field in kv else self._empty[field] if field in self._empty
                   else getattr(self, name) for field, name in STATE_NAMES.items()}
        state = self._state_type(**tensors)
        kv_len = state.key.shape[3]  # the whole buffer: slots past the position are masked
        if self.grid is not None:
            self.model.set_images(ImageContext(*image_inputs, grid=self.grid))
        try:
            if self.chunk == 1:
                logits = self.model.step(input_ids, position_ids[0, -1:].long(), state, kv_len)
            else:
                positions = position_ids[0, -self.chunk:].long()
                hidden = self.model.hidden_states(input_ids.view(self.chunk), positions, state, kv_len)
        finally:
            if self.grid is not None:
                self.model.set_images(None)
        if self.chunk == 1:
            return logits.to(LOGITS_DTYPE), logits.argmax(dim=-1).to(torch.int32)
        return hidden[-1:].float()


def image_context_for(model: nn.Module, vision: dict | None) -> ImageContext | None:
    """The export's example image inputs ("no images", fp32) from a bundle's vision section; None
    for a text-only bundle or a graph without image prompts."""
    if vision is None or not hasattr(model, "set_images"):
        return None
    return ImageContext.empty(vision["out_hidden_size"], vision["max_images"], tuple(vision["merged_grid"]),
                              vision["num_deepstack"])


def _unit_lower_solve(a: torch.Tensor, b: torch.Tensor, upper: bool, left: bool = True,
                      unitriangular: bool = False) -> torch.Tensor:
    """`linalg_solve_triangular` for the unit lower-triangular systems of the WY gated-delta chunk,
    loop-free (Core AI has no triangular solve): with N = -strictly_lower(A), nilpotent of index <= C,
    (I - N)^-1 = (I + N)(I + N^2)(I + N^4)..., ceil(log2 C) squarings applied to B."""
    if upper or not left or not unitriangular:
        raise NotImplementedError("only unit lower-triangular left solves are exported")
    n = -torch.tril(a, diagonal=-1)
    x, power, reach = b, n, 1
    while reach < a.shape[-1]:
        x = x + power @ x
        reach *= 2
        if reach < a.shape[-1]:
            power = power @ power
    return x


def _decompositions(coreai_torch) -> dict:
    table = coreai_torch.get_decomp_table()
    table[torch.ops.aten.linalg_solve_triangular.default] = _unit_lower_solve
    return table


def _state_order(exported: torch.export.ExportedProgram, buffers: list[str], kv: list[str]) -> list[str]:
    """State names in the order the converter numbers states: mutated buffers, then mutated inputs
    (the KV pair, in argument order)."""
    signature = exported.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    order = [spec.target for spec in signature.input_specs if spec.target in mutated]
    user_mutated = set(signature.user_inputs_to_mutate.values())
    inputs = [spec.arg.name for spec in signature.input_specs
              if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT and spec.arg.name in user_mutated]
    if sorted(order) != sorted(buffers) or len(inputs) != len(kv):
        raise LmbundleError(f"the step graph mutates {order} and {len(inputs)} inputs, expected {buffers} and {kv}")
    return order + kv


@dataclass
class ExportReport:
    path: Path
    seconds: float
    bytecode_bytes: int
    compiled: bool
    functions: list[str]


def _export_entry(graph: DecoderGraph, images: ImageContext | None, max_context: int, ramp: bool, decomp: dict):
    """torch.export one entry point of `graph` with its dynamic dims."""
    chunk = graph.chunk
    ids = torch.zeros(1, chunk, dtype=torch.int32)
    ramp_len = chunk + 2 if ramp else chunk
    positions = torch.arange(ramp_len, dtype=torch.int32).view(1, -1)
    image_inputs = tuple(images.tensors().values()) if images is not None else ()
    kv = tuple(t.new_zeros(*t.shape[:3], KV_EXAMPLE, t.shape[4]) for t in graph.kv_example.values())
    rest = [None] * len(image_inputs)  # the forward's *rest: the image inputs, then the KV pair
    if kv:
        seq = torch.export.Dim("kv_length", min=2, max=max(max_context, KV_EXAMPLE))
        rest += [{3: seq}, {3: seq}]
    dynamic = (None, {1: torch.export.Dim(f"positions_{chunk}", min=chunk, max=max_context)} if ramp else None,
               *((tuple(rest),) if rest else ()))
    with torch.no_grad():
        exported = torch.export.export(graph, (ids, positions, *image_inputs, *kv), dynamic_shapes=dynamic,
                                       strict=False)
    return exported.run_decompositions(decomp)


def export_aimodel(
    model: nn.Module,
    max_context: int,
    out_path: Path | str,
    *,
    dtype: torch.dtype | None = None,
    ramp: bool = True,
    compile_for_linux: bool = False,
    vision: dict | None = None,
    kv: str = "dynamic",
    prefill_chunk: int = PREFILL_CHUNK,
) -> ExportReport:
    """Write `out_path` (a `.aimodel` folder) holding the decoder of `model`: `main` (one token) and,
    with `prefill_chunk` > 0, `prefill` (that many tokens, no head), sharing weights and states.

    `kv="dynamic"` (default): the KV states' sequence length is a dynamic dim, grown by the host up to
    `max_context`; `kv="fixed"`: the old layout, KV states of exactly `max_context` slots.
    `dtype` is the activation/state dtype (default: the embedding's). `compile_for_linux` also stores
    the compiled `main-unspecialized.odix`, which the Linux runtime needs to load the folder by path;
    it roughly doubles the folder, so bundles leave it out and `CoreAIBackend` compiles into its cache.
    `vision` (the bundle's vision section) adds the image inputs to an image-prompt graph.
    """
    coreai_torch = import_coreai_torch()
    out_path = Path(out_path)
    if out_path.suffix != ".aimodel":
        raise LmbundleError(f"{out_path}: a Core AI asset must end in .aimodel")
    if kv not in ("dynamic", "fixed"):
        raise LmbundleError(f"unknown KV layout {kv!r} (dynamic or fixed)")
    if prefill_chunk and not ramp:
        raise LmbundleError("a prefill function needs the position ramp input")
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    start = time.perf_counter()
    images = image_context_for(model, vision)
    input_names = [*STEP_INPUT_NAMES, *(IMAGE_INPUT_NAMES if images is not None else ())]
    fixed = max_context if kv == "fixed" else None
    chunks = {"main": 1} | ({PREFILL_FUNCTION: prefill_chunk} if prefill_chunk else {})
    decomp = _decompositions(coreai_torch)

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    previous, model.ops = model.ops, CoreAIStepOps()  # never a device kernel in the graph
    try:
        for name, chunk in chunks.items():
            graph = DecoderGraph(model, dtype, images, chunk=chunk, fixed_capacity=fixed).eval()
            exported = _export_entry(graph, images, max_context, ramp, decomp)
            buffers = [n for n in STATE_NAMES.values() if n in graph._buffers]
            kv_names = [STATE_NAMES[f] for f in graph.kv_example]
            converter.add_exported_program(
                exported, input_names=input_names,
                output_names=list(STEP_OUTPUT_NAMES) if chunk == 1 else PREFILL_OUTPUT_NAMES,
                state_names=_state_order(exported, buffers, kv_names), entrypoint_name=name,
            )
            del exported, graph
    finally:
        model.ops = previous
    with python_stdout_filtered():  # its "converting N program(s)" line (lmbundle/quiet.py)
        program = converter.to_coreai()
    program.save_asset(out_path)
    del converter, program
    if compile_for_linux:
        compile_asset(out_path, out_path)
        (out_path / COMPILED_FILE).rename(out_path / COMPILED_NAME)
        (out_path / "main-universal.dbginfo").unlink(missing_ok=True)
    return ExportReport(
        path=out_path,
        seconds=time.perf_counter() - start,
        bytecode_bytes=(out_path / "main.mlirb").stat().st_size,
        compiled=compile_for_linux,
        functions=list(chunks),
    )
