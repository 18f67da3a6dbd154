"""The prefix cache: exact greedy tokens with and without a hit (tiny checkpoint and the trained demo
model), chats that keep their cache while other users come in between, a shared system prompt
prefilled once, LRU by bytes with spill, and no state ever returned for another prefix."""

from __future__ import annotations

import pytest
import torch

from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.engine.request import Request
from lmbundle.engine.prefix_cache import PrefixCache, parse_size
from lmbundle.gates.oracle import Oracle
from tests.conftest import DEMO_QWEN35

BLOCK = 16  # small cut points, so a tiny prompt crosses several


@pytest.fixture(scope="module")
def tiny_bundle(tiny_qwen35, tmp_path_factory):
    return convert(str(tiny_qwen35), tmp_path_factory.mktemp("pc") / "fp16", quant="fp16", backend="torch", log=None)


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    return convert(str(DEMO_QWEN35), tmp_path_factory.mktemp("pcdemo") / "int8hu", quant="int8hu", backend="torch",
                   log=None)


def engines(bundle):
    cached = Engine(bundle, backend="torch", device="cpu", cache_block=BLOCK)
    plain = Engine(bundle, backend="torch", device="cpu", cache_bytes=0)
    return cached, plain


def run(engine, ids, n, chunk=0):
    done = engine.complete(Request(ids, max_tokens=n, ignore_eos=True, prefill_chunk=chunk))
    return done.tokens, done.stats.cached_tokens


def chat(engine, *turns, system="You are a helpful assistant. Answer briefly and plainly."):
    messages = [{"role": "system", "content": system}]
    for turn in turns:
        messages.append({"role": "user", "content": turn})
    return engine.chat_ids(messages)


@pytest.mark.parametrize("which", ["tiny", "demo"])
@pytest.mark.parametrize("chunk", [0, 8])
def test_greedy_tokens_with_a_hit_equal_those_without(which, chunk, tiny_bundle, demo_bundle, one_thread):
    cached, plain = engines(tiny_bundle if which == "tiny" else demo_bundle)
    base = cached.encode("Once upon a time there was a little cat who lived in a house by the sea. " * 2)
    other = cached.encode("The quick brown fox jumps over the lazy dog. ")
    prompts = [base + other, base + cached.encode(" A small model speaks plain English."), base]
    for i, ids in enumerate(prompts):
        want, _ = run(plain, ids, 12, chunk)
        got, hit = run(cached, ids, 12, chunk)
        assert got == want, i
        if i:  # every later prompt shares `base`: restored from the longest cut point inside it
            assert hit == min(len(base), len(ids) - 1) // BLOCK * BLOCK and hit > 0, (i, hit)
        run(cached, other, 3, chunk)  # another user in between: the live state is gone, the cache is not
    assert cached.prefix_cache.counts["hits"] >= 2


def test_hit_matches_the_oracle(tiny_bundle, tiny_qwen35, one_thread):
    cached, _ = engines(tiny_bundle)
    oracle = Oracle(str(tiny_qwen35))
    first = cached.encode("Once upon a time there was a little cat who lived in a house by the sea.")
    run(cached, first, 4)
    run(cached, cached.encode("The old man"), 4)
    ids = first + cached.encode(" The quick brown fox")
    got, hit = run(cached, ids, 10)
    assert hit == len(first) and got == oracle.greedy(ids, 10)


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_interleaved_chats_both_keep_their_cache(which, tiny_bundle, demo_bundle, one_thread):
    cached, plain = engines(tiny_bundle if which == "tiny" else demo_bundle)
    a1 = chat(cached, "Tell me about the cat.")
    b1 = chat(cached, "What does the fox do?", system="Be terse.")
    reply_a = run(cached, a1, 6)[0]
    reply_b = run(cached, b1, 6)[0]
    a2 = a1 + reply_a + cached.encode("\nAnd the dog?")
    b2 = b1 + reply_b + cached.encode("\nWhy?")
    for ids in (a2, b2):
        got, hit = run(cached, ids, 8)
        assert hit == len(ids) - len(cached.encode("\nAnd the dog?" if ids is a2 else "\nWhy?")) - 1
        assert got == run(plain, ids, 8)[0]


def test_shared_system_prompt_is_prefilled_once(tiny_bundle, one_thread):
    cached, plain = engines(tiny_bundle)
    system = "You are a careful assistant for the little cat who lived in a house by the sea. " * 3
    first = chat(cached, "Hello there.", system=system)
    run(cached, first, 2)
    start = cached.tokenizer.convert_tokens_to_ids("<|im_start|>")
    user_start = [p for p, t in enumerate(first) if t == start][1]  # where the user's message begins
    for question in ("Who are you?", "The quick brown fox?", "Once upon a time"):
        ids = chat(cached, question, system=system)
        got, hit = run(cached, ids, 6)
        assert user_start <= hit < user_start + 4 and got == run(plain, ids, 6)[0]


def test_the_cache_never_returns_another_prefixs_state(tiny_bundle, one_thread, monkeypatch):
    cached, plain = engines(tiny_bundle)
    monkeypatch.setattr(PrefixCache, "digest", staticmethod(lambda tokens: b"same"))  # every prefix collides
    a = cached.encode("Once upon a time there was a little cat who lived in a house by the sea.")
    b = cached.encode("The quick brown fox jumps over the lazy dog. A small model speaks plain English.")
    run(cached, a, 4)
    got, hit = run(cached, b, 8)
    assert hit == 0 and got == run(plain, b, 8)[0]
    assert cached.prefix_cache.counts["collisions"] > 0


def test_lru_by_bytes_longest_prefix_and_spill():
    def entry(n):
        return {"rec": torch.zeros(n, dtype=torch.uint8)}

    cache = PrefixCache(device_bytes=250, device="cpu")
    cache.insert([1, 2], entry(100))
    cache.insert([1, 2, 3, 4], entry(100))
    assert cache.lookup([1, 2, 3, 4, 5], limit=4) == (4, cache._find(cache_bytes([1, 2, 3, 4])))
    assert cache.lookup([1, 2, 3, 4, 5], limit=3)[0] == 2
    assert cache.lookup([1, 2, 9], limit=2, min_length=3) == (0, None)
    cache.insert([7], entry(100))  # over budget: the least recently used ([1, 2, 3, 4]) goes
    assert cache.lookup([1, 2, 3, 4, 5], limit=4)[0] == 2 and cache.used["device"] == 200
    assert cache.insert([8], entry(300)) is False and len(cache) == 2  # bigger than the whole budget

    def snapshot(i):  # 100 bytes in two dtypes and shapes
        return {"rec": torch.arange(20, dtype=torch.float32).view(4, 5) + i,
                "key": torch.full((2, 5), i, dtype=torch.bfloat16)}

    spilling = PrefixCache(device_bytes=150, host_bytes=200, device="cuda")  # the bookkeeping needs no GPU
    for i in range(4):
        spilling.insert([i], snapshot(i))
    spilling.settle()
    for i in (1, 2):  # spilled through the staging buffer: each tensor its own copy, as it was
        kept = spilling._find(cache_bytes([i])).tensors
        assert all(torch.equal(kept[name], t) and kept[name].dtype == t.dtype for name, t in snapshot(i).items())
        assert kept["rec"].data_ptr() != kept["key"].data_ptr()
    assert spilling.used == {"device": 100, "host": 200} and len(spilling) == 3
    assert spilling.counts["spilled"] == 3 and spilling.counts["evicted"] == 1
    assert spilling.lookup([0, 5], limit=1) == (0, None) and spilling.lookup([1, 5], limit=1)[0] == 1
    assert [e.tokens for e in spilling._entries.values() if e.on_device] == [cache_bytes([3])]
    recent = PrefixCache(device_bytes=250, host_bytes=1000, device="cuda")  # a hit keeps a device entry there
    for i in range(3):
        recent.insert([i], snapshot(i))  # [0] spills
    assert recent.lookup([1, 9], limit=1)[0] == 1
    recent.insert([3], snapshot(3))  # the least recently used on the device is [2] now, not [1]
    recent.settle()
    assert {e.tokens for e in recent._entries.values() if e.on_device} == {cache_bytes([1]), cache_bytes([3])}
    assert recent.used == {"device": 200, "host": 200} and recent.counts["spilled"] == 2
    assert parse_size("512M") == 512 << 20 and parse_size("1.5G") == 3 << 29 and parse_size("0") == 0


def cache_bytes(ids):
    import numpy as np

    return np.asarray(ids, dtype=np.int64).tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spills_land_on_the_host_with_the_values_written_before_them():
    """A spill copies on its own thread and stream: it waits for the kernels that wrote the snapshot."""
    cache = PrefixCache(device_bytes=1 << 20, host_bytes=1 << 30, device="cuda")
    snapshots = []
    for i in range(6):
        rec = torch.empty(1 << 18, device="cuda")
        torch.cuda._sleep(10_000_000)  # written after a long kernel: a copy that did not wait reads garbage
        rec.fill_(i)
        snapshots.append(rec)
        cache.insert([i], {"rec": rec})
    cache.settle()
    for i in range(5):
        entry = cache._find(cache_bytes([i]))
        assert not entry.on_device and entry.tensors["rec"].device.type == "cpu"
        assert torch.equal(entry.tensors["rec"], torch.full((1 << 18,), float(i)))


@pytest.mark.parametrize("max_batch", [1, 4])
def test_the_same_prompt_again_prefills_nothing(max_batch, tiny_bundle, one_thread):
    """A prompt's end is kept with its last token's logits: sent again, one request at a time or through
    the batch, it is restored whole and its tokens are those of an engine without a cache."""
    cached = Engine(tiny_bundle, backend="torch", device="cpu", cache_block=BLOCK, max_batch=max_batch)
    plain = Engine(tiny_bundle, backend="torch", device="cpu", cache_bytes=0)
    try:
        ids = cached.encode("Once upon a time there was a little cat who lived in a house by the sea.")
        want, _ = run(plain, ids, 8)
        assert run(cached, ids, 8) == (want, 0)
        run(cached, cached.encode("The old man"), 3)  # another prompt in between
        assert run(cached, ids, 8) == (want, len(ids))
        assert run(cached, ids[:-1], 8) == (run(plain, ids[:-1], 8)[0], (len(ids) - 1) // BLOCK * BLOCK)
    finally:
        cached.close()
