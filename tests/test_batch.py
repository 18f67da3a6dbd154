"""Continuous batching on the CPU (the reference ops), and on CUDA where present (one CUDA graph of all
the rows, with the rows kernels between the GEMMs, and with the reference ops alone): a greedy request's
tokens are the same alone or among 8 others that join and leave at different times, seeded sampling
repeats per request, a request that stops mid-batch frees its slot without touching the others' tokens,
and the prefix cache works through the batch slots. A request decoding alone runs the one-request step:
on the CPU its tokens still equal those it gets among others (the same fp32 math); on CUDA the two steps
agree within bf16 rounding, and with the solo step off every step is batched and exact."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.engine.request import Request
from lmbundle.engine.sampling import Sampling
from lmbundle.engine.torch_backend import CudaOptions
from tests.conftest import DEMO_QWEN35

TEXTS = [
    "Once upon a time there was a little cat",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A small model speaks plain English.",
    "The old man",
    "Once upon a time there was a little cat who lived in a house by the sea. " * 2,
    "The king",
    "lived in a house by the sea",
    "The quick brown fox",
    "plain English. A small model",
]
LENGTHS = [12, 5, 16, 9, 3, 14, 7, 10, 11]  # they leave the batch at different steps


@pytest.fixture(scope="module")
def bundles(tiny_qwen35, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return {"tiny": convert(str(tiny_qwen35), root / "tiny", quant="fp16", backend="torch", max_context=512, log=None),
            "demo": convert(str(DEMO_QWEN35), root / "demo", quant="int8hu", backend="torch", max_context=512,
                            log=None)}


def answer(engine, ids, n, sampling=Sampling()):
    return engine.complete(Request(ids, max_tokens=n, sampling=sampling, ignore_eos=True))


def tokens(engine, ids, n, sampling=Sampling()):
    return answer(engine, ids, n, sampling).tokens


def together(engine, prompts, lengths, sampling=Sampling(), stagger=0.0):
    def run(i):
        time.sleep(stagger * i)
        return tokens(engine, prompts[i], lengths[i], sampling)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(run, range(len(prompts))))


CUDA = [("tiny", "cuda"), ("demo", "cuda"), ("tiny", "cuda-reference"), ("demo", "cuda-reference")] \
    if torch.cuda.is_available() else []


@pytest.mark.parametrize("which,device", [("tiny", "cpu"), ("demo", "cpu"), ("tiny", "cpu-padded"), *CUDA])
def test_greedy_alone_equals_among_eight_others(which, device, bundles, one_thread):
    """On CUDA with every step batched (`solo_step=False`): there the one-request step's kernels round
    otherwise (test_solo_and_batched_steps_agree)."""
    engine = Engine(bundles[which], backend="torch", device=device.split("-")[0], max_batch=9, cache_bytes=0,
                    cache_block=16, cuda=CudaOptions(row_kernels=not device.endswith("-reference"), solo_step=False))
    if device == "cpu-padded":
        engine.scheduler.padded = True  # CUDA's layout: all max_batch rows every step, padding in free slots
    try:
        prompts = [engine.encode(t) for t in TEXTS]
        alone = [tokens(engine, p, n) for p, n in zip(prompts, LENGTHS)]
        assert engine.scheduler.peak_batch == 1
        assert (engine.scheduler.solo_steps > 0) == (engine.device.type == "cpu")  # alone: the one-request step
        assert together(engine, prompts, LENGTHS) == alone
        assert engine.scheduler.peak_batch >= 5
        assert together(engine, prompts, LENGTHS, stagger=0.01) == alone  # joining mid-way
        assert not engine.scheduler.active
        if which == "demo" and device == "cpu":  # the one-request engine (the same reference ops) agrees
            single = Engine(bundles[which], backend="torch", device=engine.device, cache_bytes=0)
            assert [tokens(single, p, n) for p, n in zip(prompts, LENGTHS)] == alone
    finally:
        engine.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_solo_and_batched_steps_agree(bundles, device, one_thread):
    """The one-request step (one sequence alone) and the batched step, on the same slot state, give the same
    logits within the backend's arithmetic bound (max|diff| / std: fp32 CPU 1e-3, bf16 CUDA 0.5, the gate's)."""
    engine = Engine(bundles["demo"], backend="torch", device=device, max_batch=4, cache_bytes=0, cache_block=16)
    try:
        scheduler = engine.scheduler
        solo = answer(engine, engine.encode(TEXTS[0]), 12)  # leaves its prompt and reply in slot 0's place
        ids = engine.encode(TEXTS[0]) + solo.tokens
        state = scheduler.pool.slot(0)
        scheduler.model.forward_tokens(torch.tensor(ids[:-1], device=engine.device), 0, state)
        saved = state.prefix(len(ids))
        token = torch.tensor([ids[-1]], device=engine.device)
        position = torch.tensor([len(ids) - 1], device=engine.device)
        with torch.inference_mode():
            alone = scheduler._solo(token, position, len(ids) - 1).float()
            state.load_prefix(saved, len(ids) - 1)
            rows = scheduler.pool.rows_of(1)
            batched = scheduler.model.step_rows(token, position, rows, scheduler.capacity, scheduler.ops).float()
        bound = 1e-3 if device == "cpu" else 0.5
        assert ((alone - batched).abs().max() / batched.std()).item() <= bound
        assert scheduler.solo_steps > 0
    finally:
        engine.close()


def test_seeded_sampling_repeats_per_request(bundles, one_thread):
    engine = Engine(bundles["tiny"], backend="torch", device="cpu", max_batch=9, cache_bytes=0, cache_block=16)
    try:
        prompts = [engine.encode(t) for t in TEXTS]
        seeded = Sampling(temperature=0.9, top_p=0.95, seed=11)
        alone = [tokens(engine, p, n, seeded) for p, n in zip(prompts, LENGTHS)]
        assert together(engine, prompts, LENGTHS, seeded) == alone
    finally:
        engine.close()


def test_logits_processors_apply_with_batching_on(bundles, one_thread):
    """A request with a logit bias (penalties, grammars and logprob recorders alike) runs on the
    one-request path even when the engine batches: the bias is applied, greedy or not."""
    from lmbundle.engine.sampling import Penalties

    engine = Engine(bundles["tiny"], backend="torch", device="cpu", max_batch=4, cache_bytes=0, cache_block=16)
    try:
        ids = engine.encode(TEXTS[0])
        plain = tokens(engine, ids, 6)
        vocab = engine.bundle.info["config"]["vocab_size"]
        barred = Sampling(processors=(Penalties(vocab, engine.device, bias={t: -100.0 for t in set(plain)}),))
        biased = tokens(engine, ids, 6, barred)
        assert not set(biased) & set(plain)
    finally:
        engine.close()


def test_a_request_stopped_mid_batch_frees_its_slot(bundles, one_thread):
    engine = Engine(bundles["tiny"], backend="torch", device="cpu", max_batch=3, cache_bytes=0, cache_block=16)
    try:
        prompts = [engine.encode(t) for t in TEXTS[:3]]
        alone = [tokens(engine, p, 20) for p in prompts]
        started = threading.Barrier(3)

        def quitter():
            gen = engine.generate(Request(prompts[0], max_tokens=400, ignore_eos=True))
            next(gen)
            started.wait()
            next(gen)
            gen.close()  # the client went away: its slot is freed between steps

        def stayer(i):
            started.wait()
            return tokens(engine, prompts[i], 20)

        with ThreadPoolExecutor(3) as pool:
            quit_ = pool.submit(quitter)
            rest = [pool.submit(stayer, i) for i in (1, 2)]
            quit_.result()
            assert [f.result() for f in rest] == alone[1:]
        deadline = time.monotonic() + 5
        while engine.scheduler.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.scheduler.active and engine.scheduler.owner == [None] * 6
        assert tokens(engine, prompts[0], 20) == alone[0]  # the freed slot serves again, exactly
        with pytest.raises(Exception, match="top_p"):  # a bad request fails alone
            tokens(engine, prompts[1], 4, Sampling(top_p=0.0))
    finally:
        engine.close()


def test_a_failing_request_fails_alone(bundles, one_thread):
    """A fault in one request's prefill (here: planted) ends that request with the error; the others in
    the batch keep their exact tokens and the slot serves again."""
    engine = Engine(bundles["tiny"], backend="torch", device="cpu", max_batch=4, cache_bytes=0, cache_block=16)
    try:
        prompts = [engine.encode(t) for t in TEXTS[:4]]
        alone = [tokens(engine, p, 12) for p in prompts]
        model, bad = engine.scheduler.model, prompts[2][0]
        real = model.forward_tokens

        def faulty(ids, start, state, **kwargs):
            if start == 0 and int(ids[0]) == bad:
                raise RuntimeError("planted fault")
            return real(ids, start, state, **kwargs)

        model.forward_tokens = faulty
        try:
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(tokens, engine, p, 12) for p in prompts]
                with pytest.raises(RuntimeError, match="planted fault"):
                    futures[2].result()
                assert [f.result() for i, f in enumerate(futures) if i != 2] == alone[:2] + alone[3:]
        finally:
            del model.forward_tokens
        assert tokens(engine, prompts[2], 12) == alone[2] and not engine.scheduler.active
    finally:
        engine.close()


def test_prefix_cache_through_the_batch(bundles, one_thread):
    began = time.perf_counter()
    engine = Engine(bundles["tiny"], backend="torch", device="cpu", max_batch=4, cache_block=16)
    plain = Engine(bundles["tiny"], backend="torch", device="cpu", max_batch=4, cache_bytes=0, cache_block=16)
    try:
        base = engine.encode(TEXTS[4])
        first = tokens(engine, base, 6)
        turn = base + first + engine.encode(" The king")
        done = answer(engine, turn, 8)
        got, stats = done.tokens, done.stats
        # the reply's state, kept at its end: the step enqueued before its last token was read fed that token
        assert stats.cached_tokens == len(base) + len(first)
        assert got == tokens(plain, turn, 8)
        assert engine.totals["cached_tokens"] >= stats.cached_tokens
        seconds = engine.scheduler.seconds  # where the batch loop spent its time, by phase
        assert min(seconds["prefill"], seconds["cache"], seconds["decode"], seconds["wait"]) > 0
        assert sum(seconds.values()) <= time.perf_counter() - began
    finally:
        engine.close()
        plain.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_host_ints_reach_the_device_intact_as_the_ring_wraps(device):
    """The scheduler's ints go through a ring of staging buffers: each result is its own tensor, unchanged
    by the later copies that reuse its buffer, and lists longer than a buffer take a plain copy."""
    from lmbundle.engine.batch_ops import HostInts

    host_ints = HostInts(torch.device(device), size=8, slots=3)
    sent = [[7 * i + j for j in range(1 + i % 8)] for i in range(10)]
    results = [host_ints(values) for values in sent]
    assert all(r.device.type == device and r.dtype == torch.long for r in results)
    assert [r.tolist() for r in results] == sent
    assert host_ints(list(range(20))).tolist() == list(range(20))
