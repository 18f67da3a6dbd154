"""The layers of the Qwen3.5 / Qwen3-VL graphs as small functions, each tested alone against transformers.

Every function works for one token (the loop-free decode step) and for a chunk of S tokens (prefill and
teacher forcing); the recurrent state math runs in fp32 whatever the weight dtype.
Shapes: x [S, hidden] (batch 1 is implicit), heads as [H, S, D]. The mixers also take *rows* (the batched
decode step): x [B, hidden] is one token of each of B sequences, each with its own state row (conv
[B, C, K-1], recurrent [B, Hv, Dk, Dv], KV [B, KVH, L, D]) and position; the same math, with a leading
batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GDNDims:
    """Sizes of a Gated DeltaNet mixer."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    eps: float  # of the gated output norm

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: q, k (key heads) and v (value heads), side by side."""
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


@dataclass(frozen=True)
class AttentionDims:
    """Sizes and variant of an attention mixer (Qwen3.5: output gate, zero-centred q/k norms)."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    output_gate: bool
    zero_centered: bool


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    """RMSNorm in fp32. Qwen3.5 stores weights around 0 and scales by (1 + w); Qwen3-VL scales by w."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return (weight * normed.to(x.dtype)).to(x.dtype)  # fp32 norm weights must not promote bf16 activations


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GDN output norm: per-head RMSNorm (plain weight) times silu(gate)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed * F.silu(gate.float())).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float = 1.0) -> torch.Tensor:
    rot = int(head_dim * partial_rotary_factor)
    return 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))


def mrope_axes(n_freqs: int, section: list[int]) -> list[int]:
    """Which position row (0 = T, 1 = H, 2 = W) drives each frequency: a constant of the config, so
    exported graphs carry no index arithmetic."""
    return [1 if i % 3 == 1 and i < 3 * section[1] else 2 if i % 3 == 2 and i < 3 * section[2] else 0
            for i in range(n_freqs)]


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, axes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, rot] for positions [3, S] (t, h, w) with interleaved M-RoPE.

    `axes` (from `mrope_axes`, None for plain RoPE) says which row drives each frequency. With text
    only the three rows are equal and this is plain RoPE; positions [S] are taken as text.
    """
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(3, -1)
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # [3, S, rot/2]
    if axes is None:
        merged = freqs[0]
    else:
        merged = torch.gather(freqs, 0, axes.view(1, 1, -1).expand(1, freqs.shape[1], -1)).squeeze(0)
    emb = torch.cat((merged, merged), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [H, S, D] (rotate-half convention); the rest pass."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    x_rot = x_rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


def causal_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv + SiLU over x [..., S, C] (weight [C, K]) with the last K-1 inputs in conv_state
    [..., C, K-1] (leading dims: independent sequences).

    Updates conv_state in place with the last K-1 inputs (of the first `valid` [1] when the rest is
    padding); written as K shifted multiply-adds so the one-token case is straight-line math (no conv
    op, no loop) in every backend.
    """
    seq = x.shape[-2]
    taps = weight.shape[-1]
    window = torch.cat((conv_state.transpose(-1, -2).to(x.dtype), x), dim=-2)  # [..., K-1+S, C]
    out = window[..., 0:seq, :] * weight[:, 0].to(x.dtype)
    for j in range(1, taps):
        out = out + window[..., j : j + seq, :] * weight[:, j].to(x.dtype)
    if valid is None:
        last = window[..., seq:, :]
    else:  # window rows valid .. valid + K - 2 are the last K-1 real inputs
        last = window.index_select(-2, valid + torch.arange(taps - 1, device=valid.device))
    conv_state.copy_(last.transpose(-1, -2).to(conv_state.dtype))
    return F.silu(out)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token of the gated delta rule, loop-free, fp32. q,k [..., H, Dk], v [..., H, Dv], g, beta [..., H],
    state [..., H, Dk, Dv] updated in place (leading dims: independent sequences). Returns o [..., H, Dv]."""
    s = state * g.exp().unsqueeze(-1).unsqueeze(-1)
    memory = (k.unsqueeze(-1) * s).sum(-2)  # elementwise + reduce: no batched matmul of tiny shapes
    delta = beta.unsqueeze(-1) * (v - memory)
    s = s + k.unsqueeze(-1) * delta.unsqueeze(-2)
    state.copy_(s)
    return (q.unsqueeze(-1) * s).sum(-2)


class WYChunks(NamedTuple):
    """A prompt's gated delta rule cut into chunks with each chunk's parallel part done (`wy_chunks`), all
    [H, N, C, .] fp32; what is left is the recurrence over the chunks (`wy_recurrence`)."""

    w_v: torch.Tensor  # [H, N, C, Dv]: the chunk's updates are U = w_v - w_k S_0
    w_k: torch.Tensor  # [H, N, C, Dk]
    q_decayed: torch.Tensor  # [H, N, C, Dk]: q_t e^{G_t}, what reads S_0
    scores: torch.Tensor  # [H, N, C, C]: q_t.k_s e^{G_t - G_s} for s <= t
    k_to_end: torch.Tensor  # [H, N, C, Dk]: k_s e^{G_C - G_s}, what writes the next S_0
    chunk_decay: torch.Tensor  # [H, N]: e^{G_C}


def wy_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              chunk: int) -> WYChunks:
    """The parallel part of `gated_delta_chunk`: q,k [S, H, Dk], v [S, H, Dv], g, beta [S, H], padded to
    whole chunks (padded tokens get no decay and no write)."""
    seq, heads, dk = k.shape
    pad = -seq % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, 0, 0, pad)), F.pad(beta, (0, 0, 0, pad))
    n = q.shape[0] // chunk
    # [H, N, C, D]
    q, k, v = (x.reshape(n, chunk, heads, -1).permute(2, 0, 1, 3) for x in (q, k, v))
    g, beta = (x.reshape(n, chunk, heads).permute(2, 0, 1) for x in (g, beta))
    cum = g.cumsum(-1)  # G_t
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    ratio = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()  # e^{G_t - G_s}, s<=t
    kk = k @ k.transpose(-1, -2)
    a = (beta.unsqueeze(-1) * ratio * kk).tril(-1)  # strictly lower
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    t_inv = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True)
    return WYChunks(w_v=t_inv @ (beta.unsqueeze(-1) * v),
                    w_k=t_inv @ (beta.unsqueeze(-1) * cum.exp().unsqueeze(-1) * k),
                    q_decayed=q * cum.exp().unsqueeze(-1),
                    scores=(q @ k.transpose(-1, -2)) * ratio,
                    k_to_end=k * (cum[..., -1:] - cum).exp().unsqueeze(-1),
                    chunk_decay=cum[..., -1].exp())


def wy_recurrence(chunks: WYChunks, state: torch.Tensor) -> torch.Tensor:
    """The sequential part of `gated_delta_chunk`: chunk by chunk, its outputs from the state it starts
    from, then the state it leaves. state [H, Dk, Dv] updated in place; returns [H, N, C, Dv]."""
    s = state
    outs = []
    for c in range(chunks.w_v.shape[1]):
        u = chunks.w_v[:, c] - chunks.w_k[:, c] @ s
        outs.append(chunks.q_decayed[:, c] @ s + chunks.scores[:, c] @ u)
        s = s * chunks.chunk_decay[:, c].view(-1, 1, 1) + chunks.k_to_end[:, c].transpose(-1, -2) @ u
    state.copy_(s)
    return torch.stack(outs, dim=1)


def gated_delta_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    chunk: int = 128, prepare: Callable[..., WYChunks] = wy_chunks,
    recurrence: Callable[[WYChunks, torch.Tensor], torch.Tensor] = wy_recurrence,
) -> torch.Tensor:
    """S tokens of the gated delta rule in chunked (WY) form, fp32: the same result as S single steps
    with a few matmuls per chunk instead of a dozen small ops per token (`prepare`, `recurrence`: a
    backend's own kernels for the parallel and the sequential part).

    The chunk length trades launches for the per-chunk solve: 2048-token prefill of the 2B on an H100
    ran 12.3k / 21.3k / 26.7k tok/s at 64 / 128 / 256 (`profile_step.py --wy-chunks`); on the trained
    demo model over 1024 tokens the logits moved 5.5e-5 / 2.6e-4 from chunk 64's. 128 keeps the
    per-chunk solve well conditioned.

    q,k [S, H, Dk], v [S, H, Dv], g, beta [S, H]; state [H, Dk, Dv] updated in place; returns [S, H, Dv].
    Within a chunk with cumulative log-decay G, the per-token updates u (S_t = e^{G_t} S_0 +
    sum_{s<=t} e^{G_t - G_s} k_s u_s^T) solve (I + A) U = beta V - beta e^{G} K S_0 with
    A[t, s] = beta_t e^{G_t - G_s} k_t.k_s (s < t): one unit-triangular solve per chunk.
    """
    seq, heads = k.shape[:2]
    out = recurrence(prepare(q, k, v, g, beta, chunk), state)
    return out.reshape(heads, -1, out.shape[-1]).transpose(0, 1)[:seq]


def attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_positions: torch.Tensor
) -> torch.Tensor:
    """Causal GQA attention of q [..., H, S, D] over cached keys/values [..., KVH, L, D] (cache slot =
    position), q_positions [..., S] (leading dims: independent sequences).

    Key j is visible to the query at position p when j <= p, so slots past the written prefix are
    masked and a fixed-capacity cache needs no separate length. Softmax in fp32. Returns [..., S, H * D].
    """
    heads, seq, dim = q.shape[-3:]
    kv_heads, length = keys.shape[-3], keys.shape[-2]
    lead = q.shape[:-3]
    qg = q.reshape(*lead, kv_heads, heads // kv_heads * seq, dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * dim**-0.5  # [..., KVH, G*S, L]
    visible = torch.arange(length, device=q.device).unsqueeze(0) <= q_positions.unsqueeze(-1)  # [..., S, L] (Core AI)
    visible = visible.repeat(*(1,) * len(lead), heads // kv_heads, 1).unsqueeze(-3)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values).reshape(*lead, heads, seq, dim)
    return out.transpose(-2, -3).reshape(*lead, seq, heads * dim)


def gdn_mix(
    projected: tuple[torch.Tensor, ...], conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
    norm_weight: torch.Tensor, dims: GDNDims, conv_state: torch.Tensor, rec_state: torch.Tensor,
    valid: torch.Tensor | None = None, delta_chunk: Callable[..., torch.Tensor] = gated_delta_chunk,
) -> torch.Tensor:
    """A Gated DeltaNet mixer from its input projections to the gated-normed output [S, Hv * Dv] (what
    out_proj reads). `projected` is (qkv, z, b, a), or the four side by side in one tensor.

    causal conv + SiLU over qkv; q, k L2-normed (k heads repeated to the value heads), beta = sigmoid(b),
    decay g = -exp(A_log) * softplus(a + dt_bias); the delta rule (one token: the loop-free step; more:
    the WY chunks) on rec_state [Hv, Dk, Dv]; then RMSNorm(o) * silu(z) per head. A chunk whose tokens
    past `valid` ([1]) are padding leaves the states as its real tokens left them: the padding gets no
    decay and no write (beta = g = 0, how the WY chunks pad themselves) and the conv keeps the real
    inputs. Rows (rec_state [B, Hv, Dk, Dv], conv_state [B, C, K-1]): token i belongs to sequence i, one
    loop-free step each.
    """
    rows = rec_state.dim() == 4
    hk, hv, dk, dv = dims.key_heads, dims.value_heads, dims.key_dim, dims.value_dim
    if len(projected) == 1:
        projected = projected[0].split([dims.conv_dim, hv * dv, hv, hv], dim=-1)
    qkv, z, b, a = projected
    seq, dtype = qkv.shape[0], qkv.dtype
    qkv = causal_conv(qkv.unsqueeze(-2), conv_state, conv_weight).squeeze(-2) if rows else causal_conv(
        qkv, conv_state, conv_weight, valid)
    q, k, v = torch.split(qkv, [hk * dk, hk * dk, hv * dv], dim=-1)
    q = l2_normalize(q.reshape(seq, hk, dk).float())
    k = l2_normalize(k.reshape(seq, hk, dk).float())
    v = v.reshape(seq, hv, dv).float()
    if hv != hk:
        q = q.repeat_interleave(hv // hk, dim=1)
        k = k.repeat_interleave(hv // hk, dim=1)
    q = q * dk**-0.5
    beta = torch.sigmoid(b).float()
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    if valid is not None:
        real = (torch.arange(seq, device=valid.device) < valid).unsqueeze(-1)
        beta, g = beta * real, g * real
    if rows:
        o = gated_delta_step(q, k, v, g, beta, rec_state)
    elif seq == 1:
        o = gated_delta_step(q[0], k[0], v[0], g[0], beta[0], rec_state).unsqueeze(0)
    else:
        o = delta_chunk(q, k, v, g, beta, rec_state)
    o = gated_rms_norm(o.to(dtype), z.reshape(seq, hv, dv), norm_weight, dims.eps)
    return o.reshape(seq, hv * dv)


def gated_attention(
    projected: tuple[torch.Tensor, ...], q_norm: torch.Tensor, k_norm: torch.Tensor, dims: AttentionDims,
    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, key_cache: torch.Tensor,
    value_cache: torch.Tensor, kv_len: int,
) -> torch.Tensor:
    """An attention mixer from its projections (q, k, v, or the three side by side) to its output
    [S, H * D] (what o_proj reads).

    q (with its output gate, Qwen3.5) and k get per-head RMSNorm and RoPE; k/v are written at
    `positions` of key/value_cache [KVH, capacity, D]; attention over the first kv_len slots; the
    output is gated by sigmoid(gate) where the variant has one. Rows (key/value_cache [B, KVH, capacity, D]):
    token i belongs to sequence i, at positions[i] of its own cache row.
    """
    rows = key_cache.dim() == 4
    heads, kvh, d = dims.heads, dims.kv_heads, dims.head_dim
    if len(projected) == 1:
        projected = projected[0].split([heads * d * (2 if dims.output_gate else 1), kvh * d, kvh * d], dim=-1)
    q, k, v = projected
    seq, dtype = q.shape[0], q.dtype
    q = q.reshape(seq, heads, -1)
    if dims.output_gate:
        q, gate = q[..., :d], q[..., d:].reshape(seq, heads * d)
    q = rms_norm(q, q_norm, dims.eps, dims.zero_centered)
    k = rms_norm(k.reshape(seq, kvh, d), k_norm, dims.eps, dims.zero_centered)
    if rows:  # [B, H, 1, D] queries, each against its own cache row
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = apply_rope(q.unsqueeze(-2), cos.unsqueeze(-2), sin.unsqueeze(-2))
        k = apply_rope(k, cos, sin)
        index = torch.arange(seq, device=positions.device)
        key_cache[index, :, positions] = k.to(key_cache.dtype)
        value_cache[index, :, positions] = v.reshape(seq, kvh, d).to(value_cache.dtype)
        o = attention(q, key_cache[..., :kv_len, :], value_cache[..., :kv_len, :], positions.unsqueeze(-1))
        o = o.reshape(seq, heads * d).to(dtype)
    else:
        v = v.reshape(seq, kvh, d).transpose(0, 1)
        q = apply_rope(q.transpose(0, 1), cos, sin)
        k = apply_rope(k.transpose(0, 1), cos, sin)
        slots = positions.view(1, -1, 1).expand(kvh, seq, d)  # a scatter, not index_copy_: it lowers to Core AI
        key_cache.scatter_(1, slots, k.to(key_cache.dtype))   # on a KV cache of dynamic length
        value_cache.scatter_(1, slots, v.to(value_cache.dtype))
        o = attention(q, key_cache[:, :kv_len], value_cache[:, :kv_len], positions).to(dtype)
    if dims.output_gate:
        o = o * torch.sigmoid(gate)
    return o
