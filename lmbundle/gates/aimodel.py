"""Core AI: every weight each function of the `.aimodel` reads, at its place, against the recipe.

A search of the bytecode for a tensor's bytes proves presence, not placement (two layers' weights
swapped pass it), and misses uniform tensors (MLIR keeps them as one-element splats). So both sides
are read in graph order:
- the bytecode, through coreai-core's MLIR reader: per function, the ops where constants meet the
  activations (`sites`), in program order, each with the constants it reads through the constant-only
  ops before it (the int8 dequantization, transposes);
- our graph (the one the exporter traced), run on the meta device for the same entry point (one step
  with the head, or a prompt chunk without), recording where each weight meets the activations
  (`WeightUses`): the order the exporter writes them in.
Each weight is expected as the exporter stores it from the recipe applied to the checkpoint: int8
linears as qweight + fp16 scales, other weights fp16, fp32 parameters as the graph computes with them
(zero-centred norms as 1 + w, A_log as -exp(A_log), conv1d as its K tap columns), and the RoPE inverse
frequencies as transformers derives them from the checkpoint's config. The longest in-order match of
the two sequences leaves out exactly the weights that differ (no constant equals them) or sit
elsewhere (misplaced), and names them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..bundle.format import IMAGE_INPUT_NAMES
from ..bundle.load import build_graph
from ..bundle.quant import apply_layout, keeps_high_precision
from ..models.decoder import DecoderForStep
from ..models.image_prompt import ImageContext
from ..models.linear import quantize_absmax

_NUMPY = {"f16": np.float16, "f32": np.float32, "si8": np.int8, "ui8": np.uint8, "si32": np.int32,
          "ui32": np.uint32, "si64": np.int64, "i1": np.bool_}
_CLOSE_NUMEL = 1 << 16  # float constants this small are also compared within 2 ulps (folds computed elsewhere)
KV_EXAMPLE = 37  # any KV length: the meta run reads no values


@dataclass(frozen=True)
class Part:
    """One constant the exporter writes for a graph tensor: `piece` "" (the tensor), "qweight" / "scales"
    (an int8 linear) or "tap j" (column j of conv1d)."""

    tensor: str
    piece: str = ""

    def __str__(self) -> str:
        return f"{self.tensor} ({self.piece})" if self.piece else self.tensor


@dataclass
class FunctionCheck:
    name: str
    expected: int = 0  # weight reads the function must make
    differ: list[str] = field(default_factory=list)  # no constant of the function equals it
    misplaced: list[str] = field(default_factory=list)  # found, but not at its place


# -- what the exporter writes -------------------------------------------------------------------------------
def expected_parts(source: dict[str, torch.Tensor], recipe: dict, zero_centered: bool,
                   inv_freq: torch.Tensor) -> dict[Part, list[np.ndarray]]:
    """Each constant the recipe applied to the checkpoint (`source`: graph name -> fp32 tensor) must
    become, with its alternative dtypes (the exporter casts fp32 parameters to the activation dtype
    where the graph does)."""
    parts: dict[Part, list[np.ndarray]] = {}
    for name, weight in source.items():
        if name == "lm_head.weight" and recipe.get("tied_head"):
            continue  # the head reads the embedding's constant
        weight = weight.detach().float()
        block = recipe.get("int8_linears", {}).get(name.removesuffix(".weight"))
        if block:
            qweight, scales = quantize_absmax(weight, block)
            parts[Part(name, "qweight")] = [qweight.numpy()]
            parts[Part(name, "scales")] = [scales.numpy()]
        elif not keeps_high_precision(name):
            parts[Part(name)] = [weight.half().numpy()]
        elif name.endswith("conv1d.weight"):
            for tap in range(weight.shape[-1]):
                parts[Part(name, f"tap {tap}")] = _both_floats(weight[:, 0, tap])
        else:
            parts[Part(name)] = _both_floats(_folded(name, weight, zero_centered))
    parts[Part("inv_freq")] = _both_floats(inv_freq.detach().float())
    return parts


def _folded(name: str, weight: torch.Tensor, zero_centered: bool) -> torch.Tensor:
    """An fp32 parameter as the graph computes with it: A_log as -exp(A_log), a zero-centred RMSNorm's
    weight as 1 + w (the GDN's gated output norm scales by w)."""
    if name.endswith("A_log"):
        return -weight.exp()
    if zero_centered and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return 1.0 + weight
    return weight


def _both_floats(t: torch.Tensor) -> list[np.ndarray]:
    return [t.float().contiguous().numpy(), t.half().contiguous().numpy()]


class _Identify:
    """Which parts a constant's bytes equal: exact (a digest) for every part, within 2 ulps for small
    float ones (derived values folded by another library)."""

    def __init__(self, parts: dict[Part, list[np.ndarray]]):
        self.exact: dict[tuple, set[Part]] = {}
        self.close: dict[tuple, list[tuple[Part, np.ndarray]]] = {}
        for part, arrays in parts.items():
            for array in arrays:
                key = (array.dtype.str, array.shape)
                self.exact.setdefault(key + (_digest(array),), set()).add(part)
                if array.dtype.kind == "f" and array.size <= _CLOSE_NUMEL:
                    self.close.setdefault(key, []).append((part, array))
        self.classes = {key[:2] for key in self.exact}

    def __call__(self, array: np.ndarray) -> frozenset[Part]:
        key = (array.dtype.str, array.shape)
        found = set(self.exact.get(key + (_digest(array),), ()))
        for part, expected in self.close.get(key, ()):
            if part not in found and _within_ulps(array, expected):
                found.add(part)
        return frozenset(found)


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8).data, digest_size=16).digest()


def _within_ulps(a: np.ndarray, b: np.ndarray, ulps: int = 2) -> bool:
    spacing = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(a.dtype)).astype(np.float64)
    return bool(np.all(np.abs(a.astype(np.float64) - b.astype(np.float64)) <= ulps * spacing))


# -- the bytecode --------------------------------------------------------------------------------------------
@dataclass
class BytecodeFunction:
    name: str
    inputs: dict[str, tuple[int, ...] | None]  # name -> shape (-1: dynamic; None: a state)
    outputs: list[str]
    reads: list[tuple[int, object]]  # (site number, constant op) in program order


def read_bytecode(asset: Path) -> tuple[object, list[BytecodeFunction]]:
    """The functions of an `.aimodel`'s bytecode (and the MLIR module that owns their ops). coreai-core
    1.0.0b3 has no public walker of a program's ops: this reads the MLIR module behind the public
    `AIModelAsset.program`."""
    from coreai._compiler import ir
    from coreai.authoring.asset import AIModelAsset

    module = AIModelAsset.load(asset).program._module._mlir_module
    functions = []
    for graph in module.body.operations:
        op = graph.operation
        kind = ir.FunctionType(ir.TypeAttr(op.attributes["function_type"]).value)
        names = [[ir.StringAttr(ir.DictAttr(a)["coreai.name"]).value for a in ir.ArrayAttr(op.attributes[key])]
                 for key in ("arg_attrs", "res_attrs")]
        inputs = {name: _shape(t) for name, t in zip(names[0], kind.inputs)}
        reads = list(_constant_reads(op.regions[0].blocks[0]))
        functions.append(BytecodeFunction(ir.StringAttr(op.attributes["sym_name"]).value, inputs, names[1], reads))
    return module, functions


def _shape(mlir_type) -> tuple[int, ...] | None:
    """A plain tensor argument's shape (-1: dynamic); None for a state handle."""
    from coreai._compiler import ir

    if not ir.RankedTensorType.isinstance(mlir_type):
        return None
    kind = ir.RankedTensorType(mlir_type)
    return tuple(-1 if kind.is_dynamic_dim(i) else kind.get_dim_size(i) for i in range(kind.rank))


def _constant_reads(block) -> Iterator[tuple[int, object]]:
    """(site, constant op) for each op that mixes activations with constants, in program order, with
    the constants it reads directly or through constant-only ops (nested regions walked in place)."""
    constants, derived, site = {}, set(), 0

    def leaves(value):
        if value in constants:
            yield constants[value]
        elif value in derived:
            for operand in value.owner.operands:
                yield from leaves(operand)

    def walk(current) -> Iterator[tuple[int, object]]:
        nonlocal site
        for item in current.operations:
            op = item.operation
            if op.name == "coreai.constant":
                constants[op.result] = op
                continue
            operands = list(op.operands)
            if operands and not len(op.regions) and all(v in constants or v in derived for v in operands):
                derived.update(op.results)
                continue
            site += 1
            for value in operands:
                for constant in leaves(value):
                    yield site, constant
            for region in op.regions:
                for inner in region.blocks:
                    yield from walk(inner)

    yield from walk(block)


def constant_value(op) -> np.ndarray:
    """A constant's elements (a splat expanded), through coreai-core's own copy."""
    from coreai._compiler import ir
    from coreai._compiler._mlir_libs._coreaiIR._bindings import compiler

    kind = ir.RankedTensorType(op.result.type)
    dtype = np.dtype(_NUMPY[str(kind.element_type)])
    shape = tuple(kind.shape)
    out = np.empty(shape, dtype)
    compiler.copy_constant_value_to_array(constant_op=op, destination=out.reshape(-1).view(np.uint8))
    return out


def constant_class(op) -> tuple[str, tuple[int, ...]] | None:
    from coreai._compiler import ir

    kind = ir.RankedTensorType(op.result.type)
    dtype = _NUMPY.get(str(kind.element_type))
    return (np.dtype(dtype).str, tuple(kind.shape)) if dtype is not None else None


# -- where our graph reads its weights -------------------------------------------------------------------------
class WeightUses(TorchFunctionMode):
    """Records, in execution order, each op where a value computed from weights alone meets an
    activation (the exporter folds everything before it into constants), with the weights it reads.

    The converter drops the ops whose results reach neither an output nor a state: a function with no
    outputs (the prompt function) keeps only what feeds a state write (the last attention layer's keys
    and values, not its queries or MLP). So every op on the activations is a node of the dataflow, the
    in-place writes into the states (`states`, their views included) are its sinks, and `reads(outputs)`
    keeps the reads of the ops that reach a sink or one of `outputs`."""

    def __init__(self, weights: dict[int, str], activations: list[torch.Tensor], states: list[torch.Tensor]):
        super().__init__()
        self._keep = list(activations)  # ids stay unique while the tensors live
        self._sources = dict((k, (v,)) for k, v in weights.items())
        self._active = {id(t) for t in activations}
        self._states = {id(t) for t in states}
        self._nodes: list[tuple[set[int], set[int], bool, tuple[str, ...]]] = []  # inputs, outputs, sink, reads

    def _is_state(self, t: torch.Tensor) -> bool:
        return id(t) in self._states or (t._base is not None and id(t._base) in self._states)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        names = tuple(dict.fromkeys(n for t in inputs for n in self._sources.get(id(t), ())))
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._keep += outputs
        if any(id(t) in self._active for t in inputs):
            self._active.update(id(t) for t in outputs)
            name = getattr(func, "__name__", "")
            in_place = name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
            target = args[0] if in_place and args and isinstance(args[0], torch.Tensor) else None
            written = {id(target)} if target is not None else set()
            sink = target is not None and self._is_state(target)
            self._nodes.append(({id(t) for t in inputs}, {id(t) for t in outputs} | written, sink, names))
        elif names:
            self._sources.update((id(t), names) for t in outputs)
        return out

    def reads(self, outputs: list[torch.Tensor]) -> list[tuple[str, ...]]:
        """The weight reads of the ops that reach a state write or `outputs`, in execution order."""
        live = {id(t) for t in outputs}
        kept = []
        for inputs, results, sink, names in reversed(self._nodes):
            if sink or results & live:
                live |= inputs
                if names:
                    kept.append(names)
        return kept[::-1]


def meta_graph(arch, cfg, recipe: dict) -> DecoderForStep:
    """The bundle's graph with the recipe's layout, on the meta device (no memory, no values)."""
    with torch.device("meta"):
        model = build_graph(arch.model, cfg, torch.float16)
        apply_layout(model, recipe)
        if recipe.get("tied_head"):
            model.tie_head()
    return model


def weight_reads(model: DecoderForStep, function: BytecodeFunction, vision: dict | None, chunk: int) -> list[Part]:
    """The parts `function` must read, in order: our graph run for the same entry point (one step with
    the head when the function returns logits, else a prompt chunk of its input length, or of `chunk`
    tokens where that length is dynamic: the exporter pads a shorter prompt piece to it)."""
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(tensor), name)
    names.pop(id(model.rope_axes), None)  # M-RoPE's axis table: integer, checked by the image gate
    length = function.inputs["input_ids"][-1]
    length = chunk if length < 0 else length
    state = model.new_state(KV_EXAMPLE, device="meta")
    ids, positions = torch.zeros(length, dtype=torch.long, device="meta"), torch.arange(length, device="meta")
    activations = [ids, positions, *state.tensors().values()]
    takes_images = vision is not None and any(name in function.inputs for name in IMAGE_INPUT_NAMES)
    if takes_images:
        context = ImageContext.empty(vision["out_hidden_size"], vision["max_images"], tuple(vision["merged_grid"]),
                                     vision["num_deepstack"], device="meta")
        activations += list(context.tensors().values())
        model.set_images(context)
    uses = WeightUses(names, activations, list(state.tensors().values()))
    try:
        with torch.no_grad(), uses:
            if "logits" in function.outputs:
                results = [model.step(ids.view(1, 1), positions, state, KV_EXAMPLE)]
            else:
                model.hidden_states(ids, positions, state, KV_EXAMPLE, valid=torch.full((1,), length, device="meta"))
                results = []
    finally:
        if takes_images:
            model.set_images(None)
    return _parts_of(uses.reads(results))


def _parts_of(events: list[tuple[str, ...]]) -> list[Part]:
    """Graph parameter names per read -> the parts read: an int8 linear's qweight and scales, conv1d's next
    tap, the tensor itself otherwise."""
    parts, taps = [], {}
    for names in events:
        for name in names:
            module, _, leaf = name.rpartition(".")
            if leaf in ("qweight", "scales"):
                parts.append(Part(f"{module}.weight", leaf))
            elif name.endswith("conv1d.weight"):
                taps[name] = taps.get(name, -1) + 1
                parts.append(Part(name, f"tap {taps[name]}"))
            else:
                parts.append(Part(name))
    return parts


# -- the check -------------------------------------------------------------------------------------------------
def check_functions(asset: Path, model: DecoderForStep, parts: dict[Part, list[np.ndarray]],
                    vision: dict | None, chunk: int) -> list[FunctionCheck]:
    """Each function of `asset`: the parts its reads must be, matched in order against its constants
    (`chunk`: the prompt function's largest piece)."""
    identify = _Identify(parts)
    module, functions = read_bytecode(asset)
    seen: dict[int, frozenset[Part]] = {}
    checks = []
    for function in functions:
        found = []  # (site, parts the constant equals), program order
        for site, op in function.reads:
            key = id(op)
            if key not in seen:
                cls = constant_class(op)
                seen[key] = identify(constant_value(op)) if cls in identify.classes else frozenset()
            if seen[key]:
                found.append(seen[key])
        expected = weight_reads(model, function, vision, chunk)
        check = FunctionCheck(function.name, len(expected))
        anywhere = set().union(*found) if found else set()
        for part in _unmatched(expected, found):
            (check.misplaced if part in anywhere else check.differ).append(str(part))
        checks.append(check)
    del module
    return checks


def _unmatched(expected: list[Part], found: list[frozenset[Part]]) -> list[Part]:
    """The expected parts outside a longest in-order matching with the constants found (each constant
    read matches at most one part; a part matches a read whose constant equals it)."""
    n, m = len(expected), len(found)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        part, row, below = expected[i], table[i], table[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = below[j + 1] + 1 if part in found[j] else max(below[j], row[j + 1])
    missing, i, j = [], 0, 0
    while i < n:
        if j < m and expected[i] in found[j] and table[i][j] == table[i + 1][j + 1] + 1:
            i, j = i + 1, j + 1
        elif j < m and table[i][j + 1] >= table[i + 1][j]:
            j += 1
        else:
            missing.append(expected[i])
            i += 1
    return missing
