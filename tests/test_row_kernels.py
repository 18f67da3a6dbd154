"""The batched step's kernels (`engine/kernels/triton_rows.py` around the scheduler's GEMMs, and the int8
rows linear of `triton_rows_linear.py`) against the reference ops.

Each rows op (norm + projections, norm + SwiGLU, projection + residual, the GDN mixer, the attention
mixer) on random rows, each row at its own position with its own state, with the cuBLAS-style linears and
with the int8 ones; a row's result is bit-identical whatever the other rows hold; padding rows (not live)
leave their state alone; whole batched steps of a tiny checkpoint match `step_rows` with the reference
ops. The int8 linear alone on odd shapes (outputs and inputs off its tiles, K splits, fused epilogues).
On CUDA the kernels run on the GPU, else in Triton's interpreter (conftest sets `TRITON_INTERPRET=1`),
else they skip.
"""

from __future__ import annotations

import pytest
import torch

from lmbundle.bundle.format import open_bundle
from lmbundle.bundle.load import load_graph
from lmbundle.convert.convert import convert
from lmbundle.engine.batch_ops import ROW_TILE, BatchOps
from lmbundle.models.layers import mrope_cos_sin
from lmbundle.models.linear import Linear, dequantize, int8_matmul
from lmbundle.models.ops import REFERENCE, Norm, Rope
from tests import checkpoints
from tests.conftest import kernel_device, kernel_tests_need

DEVICE = kernel_device()
pytestmark = kernel_tests_need(DEVICE)
ROWS = 5  # not a power of two: the kernels pad the row tile


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=["base", "equal_gdn_heads"])
def graphs(request, tmp_path_factory):
    """{(quant, dtype): graph} of a tiny checkpoint on the device, projections fused."""
    root = tmp_path_factory.mktemp(request.param)
    ckpt = checkpoints.make_qwen35_with_tokenizer(root / "ckpt", **checkpoints.TINY_CONFIGS[request.param])
    models = {}
    for quant, dtype in (("int8hu", torch.float32), ("fp16", torch.float32), ("int8hu", torch.bfloat16)):
        bundle = root / quant
        if not bundle.exists():
            convert(str(ckpt), bundle, quant=quant, backend="torch", log=None)
        model = load_graph(open_bundle(bundle), DEVICE, dtype)
        model.fuse_projections_()
        models[quant, dtype] = model
    return models


def _ops(rows: int = ROWS, live: list[int] | None = None, int8: bool = False, pdl: bool = False):
    """The scheduler's batched ops: its GEMMs (`BatchOps`, rows padded to one tile) or the int8 rows linear,
    and the rows kernels."""
    from lmbundle.engine.kernels.triton_rows import RowStepOps

    flags = torch.tensor(live if live is not None else [1] * rows, dtype=torch.int32, device=DEVICE)
    return RowStepOps(flags, BatchOps(ROW_TILE, dense=DEVICE != "cpu"), devices=(DEVICE,), int8_linears=int8,
                      pdl=pdl)


def _x(rows: int, n: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(rows, n, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("quant,int8", [("int8hu", False), ("int8hu", True), ("fp16", False)])
def test_rows_linears_match_reference_and_each_row_stands_alone(graphs, quant, int8):
    model = graphs[quant, torch.float32]
    layer = model.model.layers[0]
    ops = _ops(int8=int8)
    torch.manual_seed(0)
    x = _x(ROWS, model.cfg.hidden_size)
    other = x.clone()
    other[1:] = _x(ROWS - 1, model.cfg.hidden_size, scale=10.0)
    for zero_centered in (True, False):
        norm = Norm(layer.input_layernorm.weight, 1e-6, zero_centered)
        for linear in (layer.linear_attn.in_proj_fused, model.lm_head):
            ours = ops.norm_linears(x, norm, [linear])[0]
            assert _rel(ours, REFERENCE.norm_linears(x, norm, [linear])[0]) < 1e-5
            assert torch.equal(ops.norm_linears(other, norm, [linear])[0][0], ours[0])
        mlp = layer.mlp
        ours = ops.norm_swiglu(x, norm, mlp.gate_proj, mlp.up_proj)
        assert _rel(ours, REFERENCE.norm_swiglu(x, norm, mlp.gate_proj, mlp.up_proj)) < 1e-5
        assert torch.equal(ops.norm_swiglu(other, norm, mlp.gate_proj, mlp.up_proj)[0], ours[0])
    h = _x(ROWS, model.cfg.intermediate_size)
    ours = ops.linear_residual(h, layer.mlp.down_proj, x)
    assert _rel(ours, REFERENCE.linear_residual(h, layer.mlp.down_proj, x)) < 1e-5


def _double(linear: Linear) -> Linear:
    """The linear's exact weights in float64 (the answer every path rounds)."""
    exact = Linear(linear.in_features, linear.out_features)
    exact.weight = torch.nn.Parameter(dequantize(linear.qweight, linear.scales, torch.float64), requires_grad=False)
    return exact


@pytest.mark.parametrize("int8", [False, True])
def test_rows_norm_and_gemms_bf16_int8_close_to_exact(graphs, int8):
    """bf16 rows (the norm kernel, GEMMs on the dequantized weights or the int8 rows linear) against float64."""
    model = graphs["int8hu", torch.bfloat16]
    layer = model.model.layers[0]
    torch.manual_seed(3)
    x = _x(ROWS, model.cfg.hidden_size, torch.bfloat16)
    norm = Norm(layer.input_layernorm.weight, 1e-6, True)
    gate, up = layer.mlp.gate_proj, layer.mlp.up_proj
    ours = _ops(int8=int8).norm_swiglu(x, norm, gate, up)
    exact = REFERENCE.norm_swiglu(x.double(), Norm(norm.weight.double(), 1e-6, True), _double(gate), _double(up))
    ref = REFERENCE.norm_swiglu(x, norm, gate, up)
    bound = 3e-2 if DEVICE == "cpu" else 2 * _rel(ref, exact) + 1e-3  # the interpreter rounds to bf16 by truncation
    assert _rel(ours, exact) < bound


def _rows_state(model, capacity: int, rows: int = ROWS, dtype: torch.dtype = torch.float32):
    return model.state_spec.new(capacity, DEVICE, dtype, slots=rows).rows_of(rows)


@pytest.mark.parametrize("int8", [False, True])
def test_gated_delta_rows_match_reference_over_steps(graphs, int8):
    """Norm + projections + conv, the delta rule and out_proj with the gated norm (and the residual, fused
    into the int8 linear), per row; a padding row's recurrent state stays as it was."""
    model = graphs["int8hu", torch.float32]
    layer = model.model.layers[0]
    mixer = layer.linear_attn
    norm = Norm(layer.input_layernorm.weight, model.cfg.rms_norm_eps, True)
    ref_state, our_state = _rows_state(model, 16), _rows_state(model, 16)
    ops = _ops(live=[1] * (ROWS - 1) + [0], int8=int8)
    torch.manual_seed(1)
    for _ in range(4):
        x = _x(ROWS, model.cfg.hidden_size)
        outputs = []
        for step_ops, state in ((REFERENCE, ref_state), (ops, our_state)):
            o = step_ops.gdn_mixer(x, norm, mixer.weights(), state.conv[0], state.rec[0])
            outputs.append(step_ops.linear_residual(o, mixer.out_proj, torch.zeros_like(x)))
        ref, ours = outputs
        live = slice(0, ROWS - 1)
        assert _rel(ours[live], ref[live]) < 1e-4
        assert _rel(our_state.conv[:, live], ref_state.conv[:, live]) < 1e-5
        assert _rel(our_state.rec[:, live], ref_state.rec[:, live]) < 1e-4
        assert not our_state.rec[:, ROWS - 1].any()


# the interpreter's 16-bit float math is not the GPU's (`kernels.interpreted`): bf16 caches on CUDA only
ATTENTION_DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
@pytest.mark.parametrize("capacity", [32, 1024])  # one split; 16 splits of which each row uses its own few
def test_attention_rows_match_reference_at_each_rows_position(graphs, capacity, dtype, monkeypatch):
    from lmbundle.engine.kernels import rows_tuning

    monkeypatch.setitem(rows_tuning.ROWS, "attention_rows", dict(rows_tuning.ROWS["attention_rows"], split_len=64))
    model = graphs["int8hu", dtype]
    layer = model.model.layers[model.state_spec.full_layers[0]]
    norm = Norm(layer.input_layernorm.weight, model.cfg.rms_norm_eps, True)
    ref_state, our_state = _rows_state(model, capacity, dtype=dtype), _rows_state(model, capacity, dtype=dtype)
    ops = _ops()
    torch.manual_seed(2)
    starts = [0, 3, 9, 60, 140][:ROWS] if capacity > 32 else [0, 3, 9, 1, 20][:ROWS]
    for step in range(5):
        positions = torch.tensor([s + step for s in starts], device=DEVICE)
        x = _x(ROWS, model.cfg.hidden_size, dtype)
        rope = Rope(*mrope_cos_sin(positions, model.inv_freq, model.rope_axes), positions, capacity)
        outputs = [step_ops.attention_mixer(x, norm, layer.self_attn.weights(), rope, state.key[0], state.value[0])
                   for step_ops, state in ((REFERENCE, ref_state), (ops, our_state))]
        # fp32: tf32 products in the attention dots. bf16: the reference rounds its scores to bf16 (~7e-3 from
        # the exact output on random bf16 q/k/v, against ~2e-3 for the kernel's fp32 scores; they differ by
        # up to ~1.6e-2), and a k or v element may round the other way
        fp32 = dtype == torch.float32
        assert _rel(outputs[1], outputs[0]) < (5e-3 if fp32 else 3e-2)
        index = torch.arange(ROWS, device=DEVICE)
        for name in ("key", "value"):
            ours, ref = getattr(our_state, name)[0], getattr(ref_state, name)[0]
            assert _rel(ours[index, :, positions], ref[index, :, positions]) < (1e-5 if fp32 else 1e-2)
        if step == 0:  # row 0 alone against the others changed: the same bits
            again = _rows_state(model, capacity, dtype=dtype)
            for name in ("key", "value"):
                getattr(again, name).copy_(getattr(our_state, name))
            x2 = x.clone()
            x2[1:] = _x(ROWS - 1, model.cfg.hidden_size, dtype)
            getattr(again, "key")[0, 0, :, positions[0]] = 0  # rewritten by the step
            alone = ops.attention_mixer(x2, norm, layer.self_attn.weights(), rope, again.key[0], again.value[0])
            assert torch.equal(alone[0], outputs[1][0])


def _batched_logits(model, ops, ids: list[list[int]], starts: list[int], capacity: int = 32) -> torch.Tensor:
    """Logits [steps, rows, V] of batched steps: row i feeds ids[i] from position starts[i]."""
    state = _rows_state(model, capacity, len(ids))
    out = []
    with torch.no_grad():
        for step in range(len(ids[0])):
            tokens = torch.tensor([row[step] for row in ids], device=DEVICE)
            positions = torch.tensor([s + step for s in starts], device=DEVICE)
            out.append(model.step_rows(tokens, positions, state, capacity, ops))
    return torch.stack(out)


IDS = [[5, 17, 33, 2], [120, 7, 64, 3], [1, 2, 3, 4]]
# (int8 linears, PDL): the interpreter runs the int8 linears only (their step runs every rows kernel too:
# half a minute a variant); PDL where the GPU has it (Hopper)
HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
STEP_VARIANTS = [(True, False)] if DEVICE == "cpu" else [(False, False), (True, False)] + [(True, True)] * HOPPER


@pytest.mark.parametrize("int8,pdl", STEP_VARIANTS)
def test_whole_batched_steps_match_reference_and_rows_stand_alone(graphs, request, monkeypatch, int8, pdl):
    if DEVICE == "cpu" and "base" not in request.node.name:
        pytest.skip("half a minute in Triton's interpreter; the base config runs there, all on CUDA")
    from lmbundle.engine.kernels import rows_tuning

    if int8:  # every linear with its K in two splits, where the tiny shapes would take one
        tiles = rows_tuning.linear_tiles
        monkeypatch.setattr(rows_tuning, "linear_tiles", lambda *shape: tiles(*shape)._replace(split_k=2))
    model = graphs["int8hu", torch.float32]
    starts = [0, 4, 11]
    ours = _batched_logits(model, _ops(3, int8=int8, pdl=pdl), IDS, starts)
    assert _rel(ours, _batched_logits(model, REFERENCE, IDS, starts)) < 1e-3
    others = [IDS[0], [9, 9, 9, 9], [40, 41, 42, 43]]
    assert torch.equal(_batched_logits(model, _ops(3, int8=int8, pdl=pdl), others, [0, 20, 2])[:, 0], ours[:, 0])


def _int8_linear(out_features: int, in_features: int) -> Linear:
    """A random int8 linear whose scales end where NaNs begin: a kernel that loads (unmasked) past the last
    group of the last row shows it."""
    linear = Linear(in_features, out_features)
    linear.weight.data = torch.randn(out_features, in_features) * 0.05
    linear.quantize_()
    linear = linear.to(DEVICE)
    padded = torch.full((linear.scales.numel() + 64,), float("nan"), dtype=linear.scales.dtype, device=DEVICE)
    padded[: linear.scales.numel()] = linear.scales.flatten()
    linear.scales = padded[: linear.scales.numel()].view_as(linear.scales)
    return linear


ODD = [  # (outputs, inputs, rows, tiles): outputs off the block, K off the loop step (1, 2, 4 groups), K splits
    (40, 96, 5, (16, 2, 1, 4, 2)),
    (70, 160, 3, (32, 4, 3, 4, 2)),
    (33, 64, 17, (16, 1, 2, 2, 2)),
]


@pytest.mark.parametrize("shape", ODD, ids=lambda s: f"{s[0]}x{s[1]}-rows{s[2]}-split{s[3][2]}")
def test_int8_rows_linear_matches_reference_on_odd_shapes(shape):
    """The int8 rows linear against `models/linear.py` (dequantize + matmul) in fp32: plain, with the
    residual add and with SwiGLU; each output row the same bits whatever the other rows hold; the split
    counters back at zero after each call."""
    from lmbundle.engine.kernels.triton_rows_linear import LinearTiles, rows_linear

    out_features, in_features, rows, tiles = shape
    tiles = LinearTiles(*tiles)
    torch.manual_seed(4)
    w, up = _int8_linear(out_features, in_features), _int8_linear(out_features, in_features)
    x, residual = _x(rows, in_features, scale=1.0), _x(rows, out_features)
    other = x.clone()
    other[1:] = _x(rows - 1, in_features, scale=5.0)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    gate = int8_matmul(x, w.qweight, w.scales)
    expected = {"plain": gate, "residual": residual + gate,
                "swiglu": torch.nn.functional.silu(gate) * int8_matmul(x, up.qweight, up.scales)}
    weight = (w.qweight, w.scales)
    fused = {"plain": {}, "residual": {"residual": residual}, "swiglu": {"up": (up.qweight, up.scales)}}
    for kind, kwargs in fused.items():
        ours = rows_linear(x, weight, tiles, counters, **kwargs)
        assert ours.shape == (rows, out_features)
        assert _rel(ours, expected[kind]) < 1e-5, kind
        assert not counters.any()
        assert torch.equal(rows_linear(other, weight, tiles, counters, **kwargs)[0], ours[0]), kind
