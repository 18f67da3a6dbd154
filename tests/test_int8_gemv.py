"""The ops' int8 matmul: the Triton ops' fused GEMV against a float64 reference on CUDA (eager and inside
a captured CUDA graph), and exact fallback to the reference (dequantize + F.linear) everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmbundle.models.linear import Linear, dequantize, quantize_absmax
from lmbundle.models.ops import REFERENCE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
triton = pytest.importorskip("triton")
from lmbundle.engine.kernels.triton_ops import TritonStepOps  # noqa: E402

OPS = TritonStepOps(pdl=False)


def int8_matmul(x, q, s):
    return OPS.int8_matmul(x, q, s)


def _linear(q: torch.Tensor, s: torch.Tensor) -> Linear:
    layer = Linear(q.shape[1], q.shape[0])
    layer.weight, layer.qweight, layer.scales = None, q, s
    return layer


def int8_swiglu(x, qg, sg, qu, su):
    return OPS.swiglu(x, _linear(qg, sg), _linear(qu, su))


def _quantized(out_features: int, in_features: int, device: str = "cpu", block: int = 32):
    q, s = quantize_absmax(torch.randn(out_features, in_features), block)
    return q.to(device), s.to(device)


def _exact(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x @ (q * s).T in float64: the answer every path rounds."""
    return F.linear(x.double(), dequantize(q, s, torch.float64))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", [(3, 64), (1, 2, 96), (7, 128)])
def test_cpu_falls_back_to_the_reference_exactly(shape):
    q, s = _quantized(40, shape[-1])
    x = torch.randn(*shape, dtype=torch.bfloat16)
    assert torch.equal(int8_matmul(x, q, s), F.linear(x, dequantize(q, s, x.dtype)))
    q2, s2 = _quantized(40, shape[-1])
    swiglu_ref = F.silu(F.linear(x, dequantize(q, s, x.dtype))) * F.linear(x, dequantize(q2, s2, x.dtype))
    assert torch.equal(int8_swiglu(x, q, s, q2, s2), swiglu_ref)


def test_linear_through_the_ops_matches_the_module():
    layer = _linear(*_quantized(24, 64))
    x = torch.randn(2, 64)
    assert torch.equal(REFERENCE.linear(x, layer), layer(x))
    assert torch.equal(OPS.linear(x, layer), layer(x))


@cuda
@pytest.mark.parametrize("out_features,in_features", [(2048, 2048), (517, 96), (300, 6144), (24, 800)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_gemv_matches_float64(out_features, in_features, rows):
    q, s = _quantized(out_features, in_features, "cuda")
    q[0, :3] = torch.tensor([-127, 127, 0], dtype=torch.int8)  # the extremes of the byte trick
    x = torch.randn(1, rows, in_features, device="cuda", dtype=torch.bfloat16)
    assert OPS._short_int8(x, q, s)
    y = int8_matmul(x, q, s)
    assert y.shape == (1, rows, out_features) and y.dtype == torch.bfloat16
    ref = _exact(x, q, s)
    assert _rel_err(y, ref) < 5e-3  # one bf16 rounding of an fp32 sum
    assert _rel_err(int8_matmul(x.float(), q, s), ref) < 1e-5


@cuda
def test_swiglu_matches_float64():
    (qg, sg), (qu, su) = _quantized(6144, 2048, "cuda"), _quantized(6144, 2048, "cuda")
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    ref = F.silu(_exact(x, qg, sg)) * _exact(x, qu, su)
    assert _rel_err(int8_swiglu(x, qg, sg, qu, su), ref) < 5e-3


@cuda
def test_other_calls_take_the_reference_on_cuda():
    q, s = _quantized(64, 128, "cuda")
    x = torch.randn(5, 128, device="cuda", dtype=torch.bfloat16)
    assert not OPS._short_int8(x, q, s)
    assert torch.equal(int8_matmul(x, q, s), F.linear(x, dequantize(q, s, x.dtype)))
    q1, s1 = _quantized(64, 128, "cuda", block=128)  # per-channel scales
    assert not OPS._short_int8(x[:1], q1, s1)


@cuda
def test_gemv_replays_inside_a_cuda_graph():
    q, s = _quantized(4096, 2048, "cuda")
    static_x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    int8_matmul(static_x, q, s)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = int8_matmul(static_x, q, s)
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(static_y, _exact(static_x, q, s)) < 5e-3
