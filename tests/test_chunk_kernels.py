"""The prompt chunk's GDN kernels (`engine/kernels/triton_chunks.py`) against the reference: each chunk's
parallel part (`layers.wy_chunks`) and the walk over the chunks (`layers.wy_recurrence`), alone on random
inputs with a carried-in state, then whole prompt chunks of a tiny checkpoint through
`TritonStepOps`. On CUDA the kernel runs on the GPU, else in Triton's
interpreter (conftest sets `TRITON_INTERPRET=1`), else the tests skip."""

from __future__ import annotations

import pytest
import torch

from lmbundle.bundle.format import open_bundle
from lmbundle.bundle.load import load_graph
from lmbundle.convert.convert import convert
from lmbundle.models import layers
from lmbundle.models.ops import REFERENCE, Norm
from tests import checkpoints
from tests.conftest import kernel_device, kernel_tests_need

DEVICE = kernel_device()
pytestmark = kernel_tests_need(DEVICE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _inputs(seq: int, heads: int, dk: int, dv: int, seed: int):
    torch.manual_seed(seed)
    q = layers.l2_normalize(torch.randn(seq, heads, dk, device=DEVICE)) * dk**-0.5
    k = layers.l2_normalize(torch.randn(seq, heads, dk, device=DEVICE))
    v = torch.randn(seq, heads, dv, device=DEVICE)
    g = -torch.rand(seq, heads, device=DEVICE) * 0.3
    beta = torch.rand(seq, heads, device=DEVICE)
    return q, k, v, g, beta


@pytest.mark.parametrize("seq,chunk,dv", [(200, 64, 32), (64, 64, 16), (40, 16, 64)])
def test_walk_matches_the_reference_and_carries_the_state(seq, chunk, dv):
    from lmbundle.engine.kernels.triton_chunks import wy_recurrence

    heads, dk = 3, 32
    q, k, v, g, beta = _inputs(seq, heads, dk, dv, seed=seq)
    start = torch.randn(heads, dk, dv, device=DEVICE) * 0.5
    ref_state, our_state = start.clone(), start.clone()
    ref = layers.gated_delta_chunk(q, k, v, g, beta, ref_state, chunk=chunk)
    ours = layers.gated_delta_chunk(q, k, v, g, beta, our_state, chunk=chunk, recurrence=wy_recurrence)
    assert _rel(ours, ref) < 1e-5 and _rel(our_state, ref_state) < 1e-5
    # the state it leaves is the one the token-by-token rule leaves
    steps = start.clone()
    for t in range(seq):
        layers.gated_delta_step(q[t], k[t], v[t], g[t], beta[t], steps)
    assert _rel(our_state, steps) < 1e-4


@pytest.mark.parametrize("seq,chunk", [(100, 32), (32, 32), (70, 64)])
def test_chunk_preparation_matches_the_reference(seq, chunk):
    """Three programs a chunk (the keys', values' and queries' parts), each output as the reference's."""
    from lmbundle.engine.kernels.triton_chunks import wy_chunks

    q, k, v, g, beta = _inputs(seq, 3, 32, 64, seed=seq + 1)
    ours, ref = wy_chunks(q, k, v, g, beta, chunk), layers.wy_chunks(q, k, v, g, beta, chunk)
    for name, a, b in zip(layers.WYChunks._fields, ours, ref):
        assert a.shape == b.shape and _rel(a, b) < 1e-5, name
    # and with the walk: the whole chunked rule, both parts ours
    from lmbundle.engine.kernels.triton_chunks import wy_recurrence

    state, ref_state = torch.zeros(3, 32, 64, device=DEVICE), torch.zeros(3, 32, 64, device=DEVICE)
    out = layers.gated_delta_chunk(q, k, v, g, beta, state, chunk=chunk, prepare=wy_chunks, recurrence=wy_recurrence)
    assert _rel(out, layers.gated_delta_chunk(q, k, v, g, beta, ref_state, chunk=chunk)) < 1e-5
    assert _rel(state, ref_state) < 1e-5


def test_shapes_it_does_not_tile_take_the_reference():
    from lmbundle.engine.kernels.triton_chunks import wy_chunks, wy_recurrence

    q, k, v, g, beta = _inputs(50, 2, 24, 16, seed=1)  # a key dim of 24: not a power of two
    state, ref_state = torch.zeros(2, 24, 16, device=DEVICE), torch.zeros(2, 24, 16, device=DEVICE)
    ours = layers.gated_delta_chunk(q, k, v, g, beta, state, chunk=16, prepare=wy_chunks, recurrence=wy_recurrence)
    assert torch.equal(ours, layers.gated_delta_chunk(q, k, v, g, beta, ref_state, chunk=16))


def test_prompt_chunks_through_the_ops_match_the_reference(tmp_path):
    """A 150-token prompt in chunks of 100 and 50 (the second starts from the first's state) on a tiny
    checkpoint, fp32: logits and the states left behind, against the reference ops (chunks of 128). The
    first chunk prepares its WY chunks in torch ops, the second (at most `wy_prepare_max`) in the kernel."""
    from lmbundle.engine.kernels.triton_ops import TritonStepOps

    ckpt = checkpoints.make_qwen35_with_tokenizer(tmp_path / "ckpt", **checkpoints.TINY_CONFIGS["base"])
    model = load_graph(open_bundle(convert(str(ckpt), tmp_path / "b", quant="fp16", backend="torch", log=None)),
                       DEVICE, torch.float32)
    model.fuse_projections_()
    ids = torch.randint(0, model.cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for ops in (REFERENCE, TritonStepOps(False, devices=(DEVICE,), wy_prepare_max=64)):
        model.ops = ops
        state = model.new_state(160)
        with torch.no_grad():
            logits = torch.cat([model.forward_tokens(ids[:100], 0, state), model.forward_tokens(ids[100:], 100, state)])
        results.append((logits, state))
    (ref, ref_state), (ours, our_state) = results
    assert _rel(ours, ref) < 1e-4
    assert _rel(our_state.rec, ref_state.rec) < 1e-4 and _rel(our_state.conv, ref_state.conv) < 1e-6
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() == 1.0


# value heads 2x the key heads; equal, 3 taps; head dims the kernels do not tile (the reference runs)
@pytest.mark.parametrize("config", ["base", "equal_gdn_heads", "odd_dims"])
def test_prompt_gdn_mixer_kernels_match_the_reference(tmp_path, config):
    """The prompt chunk's GDN mixer as kernels (norm, conv + the delta rule's inputs, WY prepare and walk,
    output norm) against the reference composition, fp32, over chunks that carry the states on: 2 tokens
    (fewer than the conv's history), 37, and a chunk of 40 whose last 15 are padding (`valid`)."""
    from lmbundle.engine.kernels.triton_ops import TritonStepOps

    ckpt = checkpoints.make_qwen35_with_tokenizer(tmp_path / "ckpt", **checkpoints.TINY_CONFIGS[config])
    model = load_graph(open_bundle(convert(str(ckpt), tmp_path / "b", quant="fp16", backend="torch", log=None)),
                       DEVICE, torch.float32)
    model.fuse_projections_()
    layer = model.model.layers[0]
    norm = Norm(layer.input_layernorm.weight, model.cfg.rms_norm_eps, True)
    ops = TritonStepOps(False, devices=(DEVICE,))
    ref_state, our_state = model.new_state(128), model.new_state(128)
    torch.manual_seed(2)
    for seq, valid in ((2, None), (37, None), (40, 25)):
        x = torch.randn(seq, model.cfg.hidden_size, device=DEVICE) * 3.0
        real = None if valid is None else torch.tensor([valid], device=DEVICE)
        ref, ours = (step_ops.gdn_mixer(x, norm, layer.linear_attn.weights(), state.conv[0, 0], state.rec[0, 0], real)
                     for step_ops, state in ((REFERENCE, ref_state), (ops, our_state)))
        rows = valid or seq
        errors = (_rel(ours[:rows], ref[:rows]), _rel(our_state.rec, ref_state.rec))
        assert max(errors) < 1e-4, (seq, errors)  # the walks' TF32x3 products on CUDA; ~1e-7 interpreted
        assert _rel(our_state.conv, ref_state.conv) < 1e-6, seq  # the inputs, through norms of other roundings


@pytest.mark.parametrize("gate,zero_centered,heads,dim,rot,dtype", [
    (True, True, (8, 2), 32, 8, torch.float32),     # Qwen3.5: output gate, 1 + w norms, partial rotary
    (False, False, (4, 4), 16, 16, torch.float32),  # Qwen3-VL: plain w norms, full rotary, one head a kv head
    pytest.param(True, True, (4, 1), 64, 16, torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's interpreter truncates to bf16 (a GPU rounds to nearest): CUDA only")),
])
def test_prompt_attention_kernels_match_the_reference(gate, zero_centered, heads, dim, rot, dtype):
    """A prompt chunk's attention as two kernels (k/v into the cache, then attention over it) against
    `layers.gated_attention`, for a chunk of 37 tokens at positions 20..56 whose cache already holds 20,
    over a window of 64 slots: its output and every cache slot."""
    from lmbundle.engine.kernels.triton_chunks import attention_chunk

    (h, kvh), seq, start, capacity = heads, 37, 20, 80
    dims = layers.AttentionDims(h, kvh, dim, 1e-6, gate, zero_centered)
    torch.manual_seed(dim + h)
    projected = (torch.randn(seq, h * dim * (2 if gate else 1) + 2 * kvh * dim, device=DEVICE) * 2).to(dtype)
    q_norm, k_norm = ((torch.randn(dim, device=DEVICE) * 0.1).to(dtype) for _ in range(2))
    positions = torch.arange(start, start + seq, device=DEVICE)
    cos, sin = layers.mrope_cos_sin(positions, layers.rope_inv_freq(dim, 10000.0, rot / dim), None)
    caches = [torch.zeros(kvh, capacity, dim, device=DEVICE, dtype=dtype) for _ in range(2)]
    for cache in caches:
        cache[:, :start] = torch.randn(kvh, start, dim, device=DEVICE).to(dtype)
    ref_caches, our_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    ref = layers.gated_attention((projected,), q_norm, k_norm, dims, cos, sin, positions, *ref_caches, 64)
    ours = attention_chunk(projected, positions, q_norm, k_norm, cos, sin, *our_caches, 64, heads, dim, gate,
                           zero_centered, 1e-6)
    assert ours.shape == ref.shape
    wide_caches = [c.clone() for c in caches]  # kv_len only bounds the slots: the whole capacity, same bits
    wide = attention_chunk(projected, positions, q_norm, k_norm, cos, sin, *wide_caches, capacity, heads, dim, gate,
                           zero_centered, 1e-6)
    assert torch.equal(wide, ours)
    if dtype == torch.float32:
        assert _rel(ours, ref) < 1e-5
    else:  # the reference rounds its scores to bf16: both against the same math in fp32, ours no further off
        exact = layers.gated_attention((projected.float(),), q_norm.float(), k_norm.float(), dims, cos, sin, positions,
                                       *[c.float() for c in caches], 64)
        assert _rel(ours, exact) <= max(_rel(ref, exact), 5e-3)
    for a, b in zip(our_caches, ref_caches):
        assert _rel(a, b) < (1e-6 if dtype == torch.float32 else 1e-2)
