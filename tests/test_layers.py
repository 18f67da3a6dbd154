"""Each layer of the graph, alone, against the transformers module or function it reproduces."""

from __future__ import annotations

import pytest
import torch
import transformers.models.qwen3_5.modeling_qwen3_5 as hf
from transformers import Qwen3_5TextConfig

from lmbundle.models import layers
from tests.checkpoints import BASE

torch.manual_seed(0)


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


def test_zero_centered_rms_norm():
    ref = hf.Qwen3_5RMSNorm(48, eps=1e-6)
    ref.weight.data = torch.randn(48) * 0.2
    x = torch.randn(5, 48) * 3
    close(layers.rms_norm(x, ref.weight, 1e-6, zero_centered=True), ref(x))


def test_gated_rms_norm():
    ref = hf.Qwen3_5RMSNormGated(32, eps=1e-6)
    ref.weight.data = torch.randn(32)
    x, z = torch.randn(6, 4, 32), torch.randn(6, 4, 32)
    close(layers.gated_rms_norm(x, z, ref.weight, 1e-6), ref(x, z))


@pytest.mark.parametrize("section", [[11, 11, 10], [2, 1, 1]])
def test_interleaved_mrope_matches_transformers(section):
    cfg = Qwen3_5TextConfig(**BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.25, "mrope_section": section})
    rotary = hf.Qwen3_5TextRotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(9), torch.arange(9) * 2 + 1, torch.arange(9) % 4])  # distinct t, h, w
    cos_ref, sin_ref = rotary(torch.zeros(1), pos[:, None, :])
    inv = layers.rope_inv_freq(BASE["head_dim"], 1e4, 0.25)
    cos, sin = layers.mrope_cos_sin(pos, inv, torch.tensor(layers.mrope_axes(inv.numel(), section)))
    close(cos, cos_ref[0]), close(sin, sin_ref[0])


def test_partial_rope_application():
    q, k = torch.randn(1, 4, 7, 32), torch.randn(1, 2, 7, 32)
    inv = layers.rope_inv_freq(32, 1e4, 0.25)
    cos, sin = layers.mrope_cos_sin(torch.arange(7), inv, None)
    q_ref, k_ref = hf.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    close(layers.apply_rope(q[0], cos, sin), q_ref[0]), close(layers.apply_rope(k[0], cos, sin), k_ref[0])


def test_causal_conv_chunk_then_steps():
    channels, taps, seq = 24, 4, 9
    weight = torch.randn(channels, taps)
    x = torch.randn(1, channels, seq)
    ref_full = hf.causal_conv1d_fn(x, weight, None, activation="silu")
    state = torch.zeros(channels, taps - 1)
    close(layers.causal_conv(x[0, :, :6].T, state, weight), ref_full[0, :, :6].T)
    ref_state = torch.cat([torch.zeros(1, channels, 1), x[:, :, :6]], dim=-1)[..., -taps:].clone()
    for t in range(6, seq):  # one token at a time against transformers' own decode update
        ref_t = hf.causal_conv1d_update(x[:, :, t : t + 1], ref_state, weight, None, "silu")
        close(layers.causal_conv(x[0, :, t : t + 1].T, state.clone(), weight), ref_full[0, :, t : t + 1].T)
        close(layers.causal_conv(x[0, :, t : t + 1].T, state, weight), ref_t[0].T)


def test_gated_delta_rule_step_and_chunk():
    seq, heads, dk, dv = 10, 3, 8, 6
    q, k = torch.randn(1, seq, heads, dk), torch.randn(1, seq, heads, dk)
    v = torch.randn(1, seq, heads, dv)
    g, beta = -torch.rand(1, seq, heads), torch.rand(1, seq, heads)
    init = torch.randn(1, heads, dk, dv)
    ref_out, ref_state = hf.torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=init.clone(), output_final_state=True,
        use_qk_l2norm_in_kernel=True, chunk_size=4,
    )
    qn = layers.l2_normalize(q[0]) * dk**-0.5
    kn = layers.l2_normalize(k[0])
    for chunk in (64, 4, 3):  # one padded chunk, several exact chunks, several with padding
        state = init[0].clone()
        out = layers.gated_delta_chunk(qn, kn, v[0], g[0], beta[0], state, chunk=chunk)
        close(out, ref_out[0], 1e-5), close(state, ref_state[0], 1e-5)
    state = init[0].clone()  # and token by token, as the decode step runs it
    steps = torch.stack([layers.gated_delta_step(qn[t], kn[t], v[0, t], g[0, t], beta[0, t], state) for t in range(seq)])
    close(steps, ref_out[0], 1e-5), close(state, ref_state[0], 1e-5)


def test_gqa_attention_with_cache_slots():
    heads, kvh, dim, cap, seq = 4, 2, 16, 12, 3
    q = torch.randn(heads, seq, dim)
    keys, values = torch.randn(kvh, cap, dim), torch.randn(kvh, cap, dim)
    positions = torch.tensor([5, 6, 7])
    length = 8  # the queries see slots 0..position; slots 8.. are garbage and must not matter
    mask = torch.full((seq, length), float("-inf")).masked_fill(
        torch.arange(length)[None] <= positions[:, None], 0.0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = heads // kvh, False
    ref, _ = hf.eager_attention_forward(module, q[None], keys[None, :, :length], values[None, :, :length],
                                        mask[None, None], scaling=dim**-0.5)
    close(layers.attention(q, keys[:, :length], values[:, :length], positions), ref[0].reshape(seq, -1))
    garbage = keys.clone()
    garbage[:, length:] = 1e4
    close(layers.attention(q, garbage, values, positions), ref[0].reshape(seq, -1))
