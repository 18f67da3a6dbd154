"""Export the decoder to an Apple Core AI `.aimodel` (torch.export -> coreai-torch), in the shape the
hosts load (docs/coreai.md has the contract table).

Two entry points share the weights and the states:
- `main`, the one-token step: inputs `input_ids` [1, 1] int32 and `position_ids` [1, n] int32, the ramp
  0..t (dynamic length; the step's position is its last entry); outputs `logits` [1, 1, V] fp16 (the
  dtype Apple's engine samples from) and `next_token` [1, 1] int32 (the in-graph argmax of the fp32
  logits, so greedy decode never reads logits), named explicitly because the runtime's output order is
  not stable.
- `prefill`, Apple's prompt function: the same inputs and states, `input_ids` [1, q] with q dynamic up to
  `PREFILL_CHUNK`, no head and no outputs: it only advances the states. The graph pads the q tokens to a
  whole chunk (the padding leaves the GDN states as the real tokens left them) and runs the chunked path
  (the WY gated-delta chunk).
- with `vision` (a VLM bundle's metadata section), both take four more inputs set once per image by the
  host (`ImageContext`): `image_embeds` [M * T, H] fp16, `deepstack_embeds` [n_deepstack * M * T, H] fp16
  (zero rows for Qwen3.5), `rope_shift_start` and `rope_shift_amount` [M] int32; M = 1 by default.
- states, KV first: `keyCache`, `valueCache` [n_full, 1, kv_heads, -1, head_dim] (the host grows the
  sequence dim, 256 doubling; the graph masks the slots past the position), then `convState`, `recState`
  (fixed size). All four are forward arguments the graph mutates in place, so coreai-torch declares them
  in argument order.

int8 layers (`Linear` with qweight + scales) become Core AI blockwise-dequantised constants
(`coreai.blockwise_shift_scale`), so the asset stores 1 byte per weight plus the scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..bundle.coreai import COMPILED_FILE, compile_asset, import_coreai_torch
from ..bundle.format import (
    IMAGE_INPUT_NAMES,
    MAIN_FUNCTION,
    PREFILL_CHUNK,
    PREFILL_FUNCTION,
    STATE_NAMES,
    STEP_INPUT_NAMES,
    STEP_OUTPUT_NAMES,
)
from ..errors import LmbundleError
from ..models.image_prompt import ImageContext
from ..models.ops import StepOps
from ..models.state import GROWING_STATES, State
from ..quiet import python_stdout_filtered

COMPILED_NAME = "main-unspecialized.odix"  # where the Linux runtime looks for a compiled program in the folder
LOGITS_DTYPE = torch.float16  # Apple's pipelined engine takes only fp16 logits (its GPU sampler reads them)
IMAGE_DTYPE = torch.float16  # the seed's host feeds the image inputs as fp16 buffers
STATE_ORDER = tuple(STATE_NAMES)  # the `State` fields in the order the asset declares their states
KV_EXAMPLE = 37  # the traced KV length: distinct from every static size, so no dim is specialised to it
QUERY_EXAMPLE = 5  # the traced prompt-chunk length, likewise


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

    Every state is a forward argument the graph mutates in place (coreai-torch makes mutated inputs
    runtime states, in argument order), so the KV pair can take a dynamic sequence length and come
    first. `chunk` is 1 for `main` (the step: logits fp16 [1, 1, V] and the in-graph argmax
    `next_token`) and the largest prompt chunk for `prefill` (no head, no outputs).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, images: ImageContext | None = None,
                 chunk: int = 1, state_order: tuple[str, ...] = STATE_ORDER):
        super().__init__()
        self.model, self.chunk = model, chunk
        self.grid = images.grid if images is not None else None
        state = model.new_state(1, device="cpu", dtype=dtype)
        tensors = state.tensors()
        self.empty = {f: t for f, t in tensors.items() if not t.numel()}  # Qwen3-VL has no GDN state
        self.examples = {STATE_NAMES[f]: tensors[f] for f in state_order if tensors[f].numel()}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor):
        """rest: the four image inputs when the graph was built with an image context, then the states."""
        count = len(rest) - len(self.examples)
        image_inputs, states = rest[:count], dict(zip(self.examples, rest[count:]))
        state = State(**{f: states.get(name, self.empty.get(f)) for f, name in STATE_NAMES.items()})
        kv_len = state.key.shape[3]  # the whole buffer: slots past the position are masked
        if self.grid is not None:
            self.model.set_images(ImageContext(*image_inputs, grid=self.grid))
        try:
            if self.chunk == 1:
                logits = self.model.step(input_ids, position_ids[0, -1:].long(), state, kv_len)
                return logits.to(LOGITS_DTYPE), logits.argmax(dim=-1).to(torch.int32)
            self._prefill(input_ids, position_ids, state, kv_len)
            return ()
        finally:
            if self.grid is not None:
                self.model.set_images(None)

    def _prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor, state: State, kv_len) -> None:
        """q <= chunk tokens, padded to the chunk. The padding gets no GDN decay and no write
        (`hidden_states`' `valid`), and its K/V go to the slots after the real tokens, clamped to the
        buffer: slots past every real position, which the tokens that own them overwrite before any
        query can see them (the host holds back at least the prompt's last token for `main`)."""
        valid = torch.ones_like(input_ids).sum(dim=1).long()  # [1]: q as a tensor
        index = torch.arange(self.chunk, dtype=torch.long)
        ids = input_ids.view(-1).long()[torch.minimum(index, valid - 1)]  # padding repeats the last token
        last_slot = torch.arange(kv_len, dtype=torch.long)[-1:]
        positions = torch.minimum(position_ids[0, -1:].long() + 1 - valid + index, last_slot)
        self.model.hidden_states(ids, positions, state, kv_len, valid=valid)


def image_context_for(model: nn.Module, vision: dict | None) -> ImageContext | None:
    """The export's example image inputs ("no images", fp16) from a bundle's vision section; None
    for a text-only bundle or a graph without image prompts."""
    if vision is None or not hasattr(model, "set_images"):
        return None
    return ImageContext.empty(vision["out_hidden_size"], vision["max_images"], tuple(vision["merged_grid"]),
                              vision["num_deepstack"], dtype=IMAGE_DTYPE)


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


def _mutated_states(exported: torch.export.ExportedProgram, names: list[str]) -> list[str]:
    """The states in the order the converter numbers them (the mutated inputs in argument order),
    checked against the names the graph was built with."""
    signature = exported.graph_signature
    mutated = set(signature.user_inputs_to_mutate.values())
    inputs = [spec.arg.name for spec in signature.input_specs
              if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT and spec.arg.name in mutated]
    if len(inputs) != len(names) or signature.buffers_to_mutate:
        raise LmbundleError(f"the step graph mutates {len(inputs)} inputs and {len(signature.buffers_to_mutate)} "
                            f"buffers, expected the states {names}")
    return names


@dataclass
class ExportReport:
    path: Path
    seconds: float
    bytecode_bytes: int
    compiled: bool
    functions: list[str]


def _export_entry(graph: DecoderGraph, images: ImageContext | None, max_context: int, ramp: bool, decomp: dict):
    """torch.export one entry point of `graph` with its dynamic dims: the position ramp, the KV length,
    and for `prefill` the query length (1..chunk)."""
    query = QUERY_EXAMPLE if graph.chunk > 1 else 1
    ids = torch.zeros(1, query, dtype=torch.int32)
    ramp_len = query + 2 if ramp else 1
    positions = torch.arange(ramp_len, dtype=torch.int32).view(1, -1)
    image_inputs = tuple(images.tensors().values()) if images is not None else ()
    kv_length = torch.export.Dim("kv_length", min=2, max=max(max_context, KV_EXAMPLE))
    states, state_dims = [], []
    for name, example in graph.examples.items():
        growing = name in (STATE_NAMES[f] for f in GROWING_STATES)
        states.append(example.new_zeros(*example.shape[:3], KV_EXAMPLE, example.shape[4]) if growing else example)
        state_dims.append({3: kv_length} if growing else None)
    query_dim = {1: torch.export.Dim("query", min=1, max=graph.chunk)} if graph.chunk > 1 else None
    ramp_dim = {1: torch.export.Dim(f"positions_{graph.chunk}", min=1, max=max_context)} if ramp else None
    dynamic = (query_dim, ramp_dim, tuple([None] * len(image_inputs) + state_dims))
    with torch.no_grad():
        exported = torch.export.export(graph, (ids, positions, *image_inputs, *states), dynamic_shapes=dynamic,
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
    prefill_chunk: int = PREFILL_CHUNK,
    state_order: tuple[str, ...] = STATE_ORDER,
) -> ExportReport:
    """Write `out_path` (a `.aimodel` folder) holding the decoder of `model`: `main` (one token) and,
    with `prefill_chunk` > 0, `prefill` (up to that many tokens, no head, no outputs), sharing weights
    and states.

    The KV states' sequence length is a dynamic dim, grown by the host up to `max_context`. `dtype` is
    the activation/state dtype (default: the embedding's). `compile_for_linux` also stores the compiled
    `main-unspecialized.odix`, which the Linux runtime needs to load the folder by path; it roughly
    doubles the folder, so bundles leave it out and `CoreAIBackend` compiles into its cache. `vision`
    (the bundle's vision section) adds the image inputs to an image-prompt graph. `state_order` (State
    fields) is the declaration order of the states: the hosts' contract is KV first; an older lmbundle
    declared the GDN states first, and tests build that layout to check that the hosts refuse it.
    """
    coreai_torch = import_coreai_torch()
    out_path = Path(out_path)
    if out_path.suffix != ".aimodel":
        raise LmbundleError(f"{out_path}: a Core AI asset must end in .aimodel")
    if prefill_chunk and not ramp:
        raise LmbundleError("a prefill function needs the position ramp input")
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    start = time.perf_counter()
    images = image_context_for(model, vision)
    input_names = [*STEP_INPUT_NAMES, *(IMAGE_INPUT_NAMES if images is not None else ())]
    chunks = {MAIN_FUNCTION: 1} | ({PREFILL_FUNCTION: prefill_chunk} if prefill_chunk else {})
    decomp = _decompositions(coreai_torch)

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    previous, model.ops = model.ops, CoreAIStepOps()  # never a device kernel in the graph
    try:
        for name, chunk in chunks.items():
            graph = DecoderGraph(model, dtype, images, chunk=chunk, state_order=state_order).eval()
            exported = _export_entry(graph, images, max_context, ramp, decomp)
            converter.add_exported_program(
                exported, input_names=input_names,
                output_names=list(STEP_OUTPUT_NAMES) if chunk == 1 else [],
                state_names=_mutated_states(exported, list(graph.examples)), entrypoint_name=name,
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
