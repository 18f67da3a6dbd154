"""The Qwen3.5 graph against transformers' Qwen3_5ForCausalLM in fp32, loaded through our loader.

Prompt, then 64 decode steps fed with the oracle's own greedy tokens: logits within 1e-4, the same
argmax at every step; plus S=1 steps == one chunk (state and logits) and greedy generation identity.
"""

from __future__ import annotations

import gc
import os

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmbundle.convert.checkpoint import open_checkpoint
from lmbundle.convert.convert import load_checkpoint_graph
from tests import checkpoints

PROMPT_LEN, DECODE_STEPS = 12, 64


def oracle_rollout(folder, prompt, steps):
    """Logits of the prompt's last position and of each greedy decode step, from transformers."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(prompt[None], use_cache=True)
        logits, cache = [out.logits[0, -1]], out.past_key_values
        for _ in range(steps):
            out = ref(logits[-1].argmax().view(1, 1), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = out.past_key_values
    del ref
    gc.collect()
    return torch.stack(logits)


def our_rollout(model, prompt, ref_logits, capacity=128):
    state = model.new_state(capacity)
    with torch.no_grad():
        logits = [model.forward_tokens(prompt, 0, state, last_only=True)[0]]
        for i in range(ref_logits.shape[0] - 1):
            token = ref_logits[i].argmax().view(1, 1)  # teacher-forced by the oracle's greedy path
            pos = prompt.numel() + i
            logits.append(model.step(token, torch.tensor([pos]), state, kv_len=pos + 1)[0, 0])
    return torch.stack(logits)


def check_parity(folder, vocab):
    torch.manual_seed(1)
    prompt = torch.randint(0, vocab, (PROMPT_LEN,))
    ref = oracle_rollout(folder, prompt, DECODE_STEPS)
    ours = our_rollout(load_checkpoint_graph(open_checkpoint(folder)), prompt, ref)
    worst = (ours - ref).abs().max().item()
    assert worst < 1e-4, f"worst logit difference {worst:.3g}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), "argmax differs at some step"
    return worst


@pytest.mark.parametrize("name", sorted(checkpoints.TINY_CONFIGS))
def test_tiny_config_parity(tmp_path, name):
    cfg = checkpoints.TINY_CONFIGS[name]
    folder = checkpoints.make_qwen35(tmp_path / name, **cfg)
    check_parity(folder, cfg["vocab_size"])


def test_greedy_generation_identical(tiny_qwen35):
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen35, dtype=torch.float32).eval()
    prompt = torch.arange(3, 13)
    expected = ref.generate(prompt[None], max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, 10:]
    model = load_checkpoint_graph(open_checkpoint(tiny_qwen35))
    state = model.new_state(64)
    with torch.no_grad():
        token = model.forward_tokens(prompt, 0, state, last_only=True).argmax(-1)
        ours = [token.item()]
        for pos in range(10, 49):
            token = model.step(token.view(1, 1), torch.tensor([pos]), state, kv_len=pos + 1).argmax(-1)
            ours.append(token.item())
    assert ours == expected.tolist()


def test_steps_equal_one_chunk(tiny_qwen35):
    model = load_checkpoint_graph(open_checkpoint(tiny_qwen35))
    ids = torch.randint(0, 320, (17,))
    chunk_state, step_state = model.new_state(32), model.new_state(32)
    with torch.no_grad():
        chunk_logits = model.forward_tokens(ids, 0, chunk_state)
        step_logits = torch.cat([
            model.step(ids[i].view(1, 1), torch.tensor([i]), step_state, kv_len=i + 1)[0] for i in range(17)
        ])
        # and a chunk that continues from a state, as chunked prefill does
        split_state = model.new_state(32)
        model.forward_tokens(ids[:9], 0, split_state)
        tail_logits = model.forward_tokens(ids[9:], 9, split_state)
    assert (chunk_logits - step_logits).abs().max() < 1e-5
    assert (tail_logits - chunk_logits[9:]).abs().max() < 1e-5
    for name, t in chunk_state.tensors().items():
        assert (t - step_state.tensors()[name]).abs().max() < 1e-5, name
        assert (t - split_state.tensors()[name]).abs().max() < 1e-5, name


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LMBUNDLE_REAL_CONFIGS"),
                    reason="real 0.8B/2B configs take ~10 min on 2 cores: set LMBUNDLE_REAL_CONFIGS=1")
@pytest.mark.parametrize("name", ["Qwen3.5-0.8B", "Qwen3.5-2B"])
def test_real_config_parity(tmp_path, name):
    cfg = checkpoints.REAL_CONFIGS[name]
    params = 0.75e9 if "0.8B" in name else 1.9e9
    need = params * 4 * 2.3  # fp32 model + the oracle's or ours + the shard being read
    if psutil.virtual_memory().available < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free memory")
    folder = checkpoints.make_qwen35(tmp_path / "ckpt", **cfg)
    gc.collect()
    check_parity(folder, cfg["vocab_size"])
