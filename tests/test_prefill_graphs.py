"""Prompt chunks as CUDA graph replays (`engine/graphs.py`): how a piece is cut and that a padded chunk
computes its real tokens (everywhere, on the reference graph), and on CUDA that a replayed prompt computes
what the same chunks compute eagerly, bit for bit, state included, and that its logits agree with S=1
prefill."""

from __future__ import annotations

import pytest
import torch

from lmbundle.bundle.format import open_bundle
from lmbundle.bundle.load import load_graph
from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.engine.graphs import MAX_PIECE, padded_size, piece_sizes
from lmbundle.engine.request import Request
from tests import checkpoints
from tests.conftest import DEMO_QWEN35

TEXT = ("Once upon a time there was a king who had three sons, and the youngest of them "
        "went out into the world to seek his fortune. ") * 12


def test_pieces_are_powers_of_two_largest_first():
    assert piece_sizes(300) == [256, 32, 8, 4]
    assert piece_sizes(1) == [1]
    assert piece_sizes(256) == [256]
    assert piece_sizes(2 * MAX_PIECE + 3) == [MAX_PIECE, MAX_PIECE, 2, 1]
    for n in range(1, 600):
        sizes = piece_sizes(n)
        assert sum(sizes) == n and sizes == sorted(sizes, reverse=True)
        assert all(s & (s - 1) == 0 for s in sizes)


def test_padded_lengths():
    assert [padded_size(n) for n in (1, 2, 16, 17, 127, 128, 129, MAX_PIECE)] == [1, 16, 16, 32, 128, 128, 256,
                                                                                   MAX_PIECE]


@pytest.mark.parametrize("real,size,start", [(5, 16, 0), (44, 64, 256), (100, 128, 3)])
def test_padded_chunk_computes_its_real_tokens_and_leaves_the_state_as_they_left_it(real, size, start, tiny_qwen35,
                                                                                      tmp_path_factory):
    """The reference graph (fp32, CPU): a chunk of `real` tokens padded to `size` with other tokens gives the
    unpadded chunk's last logits, GDN states and KV rows; padding only writes KV slots past the real ones."""
    bundle = convert(str(tiny_qwen35), tmp_path_factory.mktemp("padded") / "b", quant="fp16", backend="torch",
                     max_context=512, log=None)
    model = load_graph(open_bundle(bundle), "cpu", torch.float32)
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(real)
    prefix, ids = torch.randint(vocab, (start,), generator=gen), torch.randint(vocab, (size,), generator=gen)
    states = []
    with torch.inference_mode():
        for padded in (False, True):
            state = model.new_state(512)
            if start:
                model.forward_tokens(prefix, 0, state)
            positions = torch.arange(start, start + (size if padded else real))
            if padded:
                x = model.hidden_states(ids, positions, state, 512, valid=torch.tensor([real]))[real - 1 :][:1]
            else:
                x = model.hidden_states(ids[:real], positions, state, 512)[-1:]
            states.append((model.head(x), state))
    (plain_logits, plain), (padded_logits, padded) = states
    torch.testing.assert_close(padded_logits, plain_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.conv, plain.conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.rec, plain.rec, rtol=1e-5, atol=1e-5)
    end = start + real
    torch.testing.assert_close(padded.key[..., :end, :], plain.key[..., :end, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.value[..., :end, :], plain.value[..., :end, :], rtol=1e-5, atol=1e-5)
    assert plain.key[..., end:, :].abs().sum() == 0 and padded.key[..., end : start + size, :].abs().sum() > 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefill_graphs")
    return convert(str(DEMO_QWEN35), root / "demo", quant="int8hu", backend="torch", max_context=1024, log=None)


@cuda
def test_replayed_prompt_equals_the_same_chunks_run_eagerly(demo_bundle):
    engine = Engine(demo_bundle, backend="torch", device="cuda", cache_bytes=0)
    backend, model = engine.backend, engine.backend.model
    assert backend.prompt_copies_bytes > 0  # an int8 body this small is kept expanded for prompts
    ids = engine.encode(TEXT)[:300]
    assert len(ids) == 300

    backend.reset(len(ids))
    graphed = backend.prefill(ids, chunk=256).logits.reshape(-1).clone()
    graphed_state = {k: v.clone() for k, v in backend.state.tensors().items()}
    assert backend._prefill_graphs.captured == 2  # 256 (no head), then 44 padded to 64 (head): one window

    with torch.inference_mode():  # the same chunks, eager
        backend.reset(len(ids))
        tokens = torch.tensor(ids, device="cuda")
        model.forward_tokens(tokens[:256], 0, backend.state, last_only=True)
        padded = torch.cat([tokens[256:], tokens[:20]])
        x = model.hidden_states(padded, torch.arange(256, 320, device="cuda"), backend.state, 512,
                                valid=torch.tensor([44], device="cuda"))
        eager = model.head(x[43:44])
    assert torch.equal(graphed, eager.reshape(-1))
    for name, t in backend.state.tensors().items():
        assert torch.equal(t[..., :300, :] if name in ("key", "value") else t,
                           graphed_state[name][..., :300, :] if name in ("key", "value") else graphed_state[name])


def test_prompt_graphs_need_one_window_only_where_attention_stops_at_the_positions(tiny_qwen35, tmp_path_factory):
    """The reference's softmax spans kv_len (a graph per window); the chunk kernel's attention does not."""
    from lmbundle.engine.kernels.triton_ops import TritonStepOps

    bundle = convert(str(tiny_qwen35), tmp_path_factory.mktemp("windows") / "b", quant="int8hu", backend="torch",
                     max_context=512, log=None)
    model = load_graph(open_bundle(bundle), "cpu", torch.float32)
    state = model.new_state(512)
    assert not model.prompt_window_free(state)
    model.ops = TritonStepOps(pdl=False, devices=("cpu",))
    assert not model.prompt_window_free(state)  # q, k, v apart: the reference composition
    model.fuse_projections_()  # what the CUDA backend loads
    assert model.prompt_window_free(state)

    odd = checkpoints.make_qwen35_with_tokenizer(tmp_path_factory.mktemp("odd") / "ckpt",
                                                 **checkpoints.TINY_CONFIGS["odd_dims"])
    model = load_graph(open_bundle(convert(str(odd), odd.parent / "b", quant="int8hu", backend="torch",
                                           max_context=512, log=None)), "cpu", torch.float32)
    model.fuse_projections_()
    model.ops = TritonStepOps(pdl=False, devices=("cpu",))
    assert not model.prompt_window_free(model.new_state(512))  # head dim 24: the reference's attention


@cuda
def test_warm_captures_every_piece_length_up_front(demo_bundle):
    engine = Engine(demo_bundle, backend="torch", device="cuda", cache_bytes=0, max_batch=4)
    graphs = engine.scheduler.prefill_graphs
    assert graphs.warm(256) == 12  # 1, 16, 32, 64, 128, 256 tokens, each with and without the head
    assert graphs.warm(256) == 0
    ids = engine.encode(TEXT)[:300]
    assert len(engine.complete(Request(ids, max_tokens=4, ignore_eos=True)).tokens) == 4
    assert graphs.captured == 12
    engine.close()


@cuda
def test_replayed_prefill_agrees_with_s1_prefill(demo_bundle):
    """Chunks (padded, replayed) and S=1 steps are different bf16 computations of the same logits: close,
    and the same top-1 wherever S=1's top two are not nearly tied."""
    engine = Engine(demo_bundle, backend="torch", device="cuda", cache_bytes=0)
    backend = engine.backend
    for n in (5, 37, 130, 300):
        ids = engine.encode(TEXT)[:n]
        backend.reset(n + 1)
        s1 = backend.logits(backend.prefill(ids, 0))
        backend.reset(n + 1)
        chunked = backend.logits(backend.prefill(ids, 256))
        assert torch.nn.functional.cosine_similarity(s1, chunked, dim=0) > 0.999, n
        top2 = s1.topk(2).values
        if top2[0] - top2[1] > 0.1:
            assert chunked.argmax() == s1.argmax(), n
