"""The fused decode kernels (`engine/kernels/triton_ops.py`) against the reference ops (`models/ops.py`).

Each fused group (input norm + projections, norm + SwiGLU, projection + residual, the GDN mixer, the
attention mixer) is checked alone on random inputs, then whole decode steps of tiny checkpoints (both
mixers, GQA and value/key head ratios, odd widths) against the reference ops. On CUDA the kernels run
on the GPU (with PDL where the GPU has it); without CUDA they run in Triton's interpreter (conftest sets
`TRITON_INTERPRET=1`; CI installs Triton for this), else they skip.
"""

from __future__ import annotations

import pytest
import torch

from lmbundle.bundle.format import open_bundle
from lmbundle.bundle.load import load_graph
from lmbundle.convert.convert import convert
from lmbundle.models.layers import mrope_cos_sin
from lmbundle.models.linear import Linear, dequantize
from lmbundle.models.ops import REFERENCE, Norm, Rope
from tests import checkpoints
from tests.conftest import kernel_device, kernel_tests_need

DEVICE = kernel_device()
PDL = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
pytestmark = kernel_tests_need(DEVICE)
# a whole decode step interprets ~100 kernel launches: CUDA runs them all, the interpreter (CI) one config
slow_in_interpreter = pytest.mark.skipif(DEVICE == "cpu", reason="minutes in Triton's interpreter; runs on CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ops():
    from lmbundle.engine.kernels.triton_ops import TritonStepOps

    return TritonStepOps(PDL, devices=(DEVICE,))


@pytest.fixture(scope="module", params=["base", "equal_gdn_heads", "deep_pattern", "odd_dims"])
def graphs(request, tmp_path_factory):
    """[int8hu bf16, fp16 bf16, int8hu fp32] graphs of a tiny checkpoint on the device, projections fused.

    The fp32 one checks the kernels' math tightly; in bf16 the reference's own roundings (eager bf16
    ops) differ from the kernels' (fp32 inside, rounded where stored) by about 1 %."""
    root = tmp_path_factory.mktemp(request.param)
    ckpt = checkpoints.make_qwen35_with_tokenizer(root / "ckpt", **checkpoints.TINY_CONFIGS[request.param])
    models = []
    for quant, dtype in (("int8hu", torch.bfloat16), ("fp16", torch.bfloat16), ("int8hu", torch.float32)):
        bundle = root / quant
        if not bundle.exists():
            convert(str(ckpt), bundle, quant=quant, backend="torch", log=None)
        model = load_graph(open_bundle(bundle), DEVICE, dtype)
        model.fuse_projections_()
        models.append(model)
    return models


def _x(n: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.randn(1, n, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("quant", [0, 1], ids=["int8hu", "fp16"])
def test_norm_projection_swiglu_and_residual_groups(graphs, ops, quant):
    model = graphs[quant]
    torch.manual_seed(0)
    layer = model.model.layers[0]
    hidden = model.cfg.hidden_size
    x = _x(hidden, 3.0)
    for zero_centered in (True, False):
        norm = Norm(layer.input_layernorm.weight, 1e-6, zero_centered)
        norm64 = Norm(norm.weight.double(), 1e-6, zero_centered)
        for linear in (layer.linear_attn.in_proj_fused, model.lm_head):
            ours = ops.norm_linears(x, norm, [linear])[0]
            assert _rel(ours, REFERENCE.norm_linears(x.double(), norm64, [_double(linear)])[0]) < 2e-2
        mlp = layer.mlp
        ours = ops.norm_swiglu(x, norm, mlp.gate_proj, mlp.up_proj)
        ref = REFERENCE.norm_swiglu(x.double(), norm64, _double(mlp.gate_proj), _double(mlp.up_proj))
        assert _rel(ours, ref) < 2e-2
    h = _x(model.cfg.intermediate_size)
    ours = ops.linear_residual(h, layer.mlp.down_proj, x)
    assert _rel(ours, REFERENCE.linear_residual(h.double(), _double(layer.mlp.down_proj), x.double())) < 1e-2


def _double(linear: Linear) -> Linear:
    """The linear's exact weights in float64 (the answer every path rounds)."""
    weight = dequantize(linear.qweight, linear.scales, torch.float64) if linear.quantized else linear.weight.double()
    exact = Linear(linear.in_features, linear.out_features)
    exact.weight = torch.nn.Parameter(weight, requires_grad=False)
    return exact


def test_gated_delta_mixer_matches_reference_over_steps(graphs, ops):
    """Norm + projections + conv, the delta rule, and out_proj with the gated norm and the residual."""
    model = graphs[2]
    layer = model.model.layers[0]
    mixer = layer.linear_attn
    norm = Norm(layer.input_layernorm.weight, model.cfg.rms_norm_eps, True)
    ref_state, our_state = model.new_state(32), model.new_state(32)
    torch.manual_seed(1)
    for _ in range(6):
        x = _x(model.cfg.hidden_size, 3.0, torch.float32)
        outputs = []
        for step_ops, state in ((REFERENCE, ref_state), (ops, our_state)):
            o = step_ops.gdn_mixer(x, norm, mixer.weights(), state.conv[0, 0], state.rec[0, 0])
            outputs.append(step_ops.linear_residual(o, mixer.out_proj, torch.zeros_like(x)))
        ref, ours = outputs
        assert _rel(ours, ref) < 1e-4
        assert _rel(our_state.conv, ref_state.conv) < 1e-5
        assert _rel(our_state.rec, ref_state.rec) < 1e-4


@pytest.mark.parametrize("capacity", [32, 4096])  # one split; 64 splits of which the first four are used
def test_attention_mixer_matches_reference_across_splits(graphs, ops, capacity):
    model = graphs[2]
    index = model.state_spec.full_layers[0]
    layer = model.model.layers[index]
    norm = Norm(layer.input_layernorm.weight, model.cfg.rms_norm_eps, True)
    ref_state, our_state = model.new_state(capacity), model.new_state(capacity)
    torch.manual_seed(2)
    positions = list(range(5)) + ([63, 64, 200] if capacity > 32 else [])
    for pos in positions:
        x = _x(model.cfg.hidden_size, 3.0, torch.float32)
        position = torch.tensor([pos], device=DEVICE)
        rope = Rope(*mrope_cos_sin(position, model.inv_freq, model.rope_axes), position, capacity)
        outputs = []
        for step_ops, state in ((REFERENCE, ref_state), (ops, our_state)):
            outputs.append(step_ops.attention_mixer(x, norm, layer.self_attn.weights(), rope,
                                                    state.key[0, 0], state.value[0, 0]))
        ref, ours = outputs
        assert _rel(ours, ref) < 5e-3  # tf32 products in the attention dots
        assert _rel(our_state.key[0, 0, :, pos], ref_state.key[0, 0, :, pos]) < 1e-5
        assert _rel(our_state.value[0, 0, :, pos], ref_state.value[0, 0, :, pos]) < 1e-5


def _decode(model, step_ops, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of decode steps over ids with the given ops."""
    model.ops = step_ops
    state = model.new_state(32)
    try:
        with torch.no_grad():
            return torch.stack([
                model.step(torch.tensor([[t]], device=DEVICE), torch.tensor([p], device=DEVICE), state, 32).view(-1)
                for p, t in enumerate(ids)])
    finally:
        model.ops = REFERENCE


IDS = [5, 17, 33, 2, 99, 120, 7, 64]


def test_whole_decode_steps_fp32_match_reference(graphs, ops, request):
    if DEVICE == "cpu" and "base" not in request.node.name:
        pytest.skip("minutes in Triton's interpreter; the base config runs there, all on CUDA")
    model = graphs[2]
    assert _rel(_decode(model, ops, IDS), _decode(model, REFERENCE, IDS)) < 1e-3


@slow_in_interpreter
@pytest.mark.parametrize("quant", [0, 1], ids=["int8hu", "fp16"])
def test_whole_decode_steps_bf16_as_close_to_fp32_as_the_reference(graphs, ops, quant):
    """In bf16 both paths round; the kernels' logits are no further from the fp32 graph's than the
    reference bf16 graph's are (the int8 weights are the same in both)."""
    truth = _decode(graphs[2], REFERENCE, IDS) if quant == 0 else None
    model = graphs[quant]
    ref, ours = _decode(model, REFERENCE, IDS), _decode(model, ops, IDS)
    assert _rel(ours, ref) < 5e-2
    if truth is not None:
        assert _rel(ours, truth) < 2 * _rel(ref, truth) + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph engine needs CUDA")
@pytest.mark.parametrize("quant", ["fp16", "int8hu"])
def test_gate_passes_on_cuda_with_fused_kernels(demo_bundles, quant):
    """The trained demo model through the CUDA engine (fused kernels in CUDA graphs) passes its gate."""
    from lmbundle.engine.engine import Engine
    from lmbundle.gates.gate import run_gate
    from lmbundle.gates.oracle import Oracle
    from tests.conftest import DEMO_QWEN35

    engine = Engine(demo_bundles[quant], backend="torch", device="cuda")
    assert type(engine.backend.model.ops).__name__ == "TritonStepOps"
    report = run_gate(engine, Oracle(str(DEMO_QWEN35)))
    assert report.passed, report.lines() + report.failures
    assert report.oracle_top1_last == 4 and report.compute == "bf16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_pass_dequantize_equals_the_reference(dtype):
    """Chunks' int8 matmuls dequantize in one Triton pass: the same bits as `models.linear.dequantize`."""
    from lmbundle.engine.kernels import triton_gemv
    from lmbundle.models.linear import dequantize, quantize_absmax

    q, s = (t.to(DEVICE) for t in quantize_absmax(torch.randn(37, 160) * 3, 32))
    ours, ref = triton_gemv.dequantize(q, s, dtype), dequantize(q, s, dtype)
    if DEVICE == "cpu":  # the interpreter rounds to bf16 by truncation
        assert _rel(ours, ref) < 1e-2
    else:
        assert torch.equal(ours, ref)


def test_prompt_chunks_read_the_kept_dense_copies(tmp_path):
    """Where memory allows, the int8 body is kept expanded for prompt chunks (`torch_backend.prompt_copies`):
    the head left out, none past a quarter of the free memory, and a chunk's matmul through a copy computes
    the bits the expansion on every call computes, from the copy itself."""
    from lmbundle.engine.kernels.triton_ops import TritonStepOps
    from lmbundle.engine.torch_backend import prompt_copies

    ckpt = checkpoints.make_qwen35_with_tokenizer(tmp_path / "ckpt", **checkpoints.TINY_CONFIGS["base"])
    model = load_graph(open_bundle(convert(str(ckpt), tmp_path / "b", quant="int8hu", backend="torch", log=None)),
                       DEVICE, torch.float32)
    model.fuse_projections_()
    body = [m for m in model.modules() if isinstance(m, Linear) and m.quantized and m is not model.lm_head]
    needed = sum(m.qweight.numel() for m in body) * 4
    assert prompt_copies(model, 4 * needed - 1) is None
    copies = prompt_copies(model, 4 * needed)
    assert copies.nbytes == needed and copies.get(model.lm_head.qweight, torch.float32) is None
    in_proj = model.model.layers[0].linear_attn.in_proj_fused  # what a prompt chunk's GDN projection reads
    assert copies.get(in_proj.qweight, torch.bfloat16) is None  # a copy serves its own dtype only

    x = torch.randn(20, in_proj.in_features, device=DEVICE)
    expanded = TritonStepOps(PDL, devices=(DEVICE,)).int8_matmul(x, in_proj.qweight, in_proj.scales)
    kept = TritonStepOps(PDL, devices=(DEVICE,), kept=copies)
    assert torch.equal(kept.int8_matmul(x, in_proj.qweight, in_proj.scales), expanded)
    copies.get(in_proj.qweight, torch.float32)[0].zero_()
    assert torch.equal(kept.int8_matmul(x, in_proj.qweight, in_proj.scales)[:, 0], torch.zeros(20, device=DEVICE))
