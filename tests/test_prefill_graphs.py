"""Prompt chunks as CUDA graph replays (`engine/graphs.py`): how a piece is cut (everywhere), and on CUDA
that a replayed prompt computes what the same chunks compute eagerly, bit for bit, state included, and
that generation after it agrees with S=1 prefill."""

from __future__ import annotations

import pytest
import torch

from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.engine.graphs import MAX_PIECE, piece_sizes
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


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefill_graphs")
    return convert(str(DEMO_QWEN35), root / "demo", quant="int8hu", backend="torch", max_context=1024, log=None)


@cuda
def test_replayed_prompt_equals_the_same_chunks_run_eagerly(demo_bundle):
    engine = Engine(demo_bundle, backend="torch", device="cuda", cache_bytes=0)
    backend, model = engine.backend, engine.backend.model
    ids = engine.encode(TEXT)[:300]
    assert len(ids) == 300

    backend.reset(len(ids))
    graphed = backend.prefill(ids, chunk=256).logits.reshape(-1).clone()
    graphed_state = {k: v.clone() for k, v in backend.state.tensors().items()}
    assert backend._prefill_graphs.captured == 4  # 256 (window 256, no head); 32, 8 (no head), 4 (head) in window 512

    with torch.inference_mode():  # the same cut, eager: 256, 32, 8, 4
        backend.reset(len(ids))
        tokens, start = torch.tensor(ids, device="cuda"), 0
        for size in [256, *piece_sizes(44)]:
            eager = model.forward_tokens(tokens[start : start + size], start, backend.state, last_only=True)
            start += size
    assert torch.equal(graphed, eager.reshape(-1))
    for name, t in backend.state.tensors().items():
        assert torch.equal(t[..., :300, :] if name in ("key", "value") else t,
                           graphed_state[name][..., :300, :] if name in ("key", "value") else graphed_state[name])


@cuda
def test_generation_after_replayed_prefill_agrees_with_s1_prefill(demo_bundle):
    engine = Engine(demo_bundle, backend="torch", device="cuda", cache_bytes=0)
    for n in (5, 37, 130, 300):
        ids = engine.encode(TEXT)[:n]
        engine.forget()
        s1 = list(engine.generate(ids, 16, stop=False, prefill_chunk=0))
        engine.forget()
        chunked = list(engine.generate(ids, 16, stop=False, prefill_chunk=256))
        assert chunked == s1, n
