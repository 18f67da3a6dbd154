"""The layers of the Qwen3.5 / Qwen3-VL graphs as small functions, each tested alone against transformers.

Every function works for one token (the loop-free decode step) and for a chunk of S tokens (prefill and
teacher forcing); the recurrent state math runs in fp32 whatever the weight dtype.
Shapes: x [S, hidden] (batch 1 is implicit), heads as [H, S, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    """RMSNorm in fp32. Qwen3.5 stores weights around 0 and scales by (1 + w); Qwen3-VL scales by w."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


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
    positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, rot] for positions [3, S] (t, h, w) with interleaved M-RoPE.

    Frequency i takes the H position if i % 3 == 1 and i < 3 * section[1], the W position if
    i % 3 == 2 and i < 3 * section[2], else T. With text only the three rows are equal and this is
    plain RoPE; positions [S] are taken as text.
    """
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(3, -1)
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # [3, S, rot/2]
    if mrope_section is None:
        merged = freqs[0]
    else:
        axis = torch.tensor(mrope_axes(inv_freq.numel(), mrope_section), device=positions.device)
        merged = torch.gather(freqs, 0, axis.view(1, 1, -1).expand(1, freqs.shape[1], -1)).squeeze(0)
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


def causal_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv + SiLU over x [S, C] (weight [C, K]) with the last K-1 inputs in conv_state [C, K-1].

    Updates conv_state in place with the last K-1 inputs; written as K shifted multiply-adds so the
    one-token case is straight-line math (no conv op, no loop) in every backend.
    """
    seq = x.shape[0]
    taps = weight.shape[-1]
    window = torch.cat((conv_state.transpose(0, 1).to(x.dtype), x), dim=0)  # [K-1+S, C]
    out = window[0:seq] * weight[:, 0].to(x.dtype)
    for j in range(1, taps):
        out = out + window[j : j + seq] * weight[:, j].to(x.dtype)
    conv_state.copy_(window[seq:].transpose(0, 1).to(conv_state.dtype))
    return F.silu(out)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token of the gated delta rule, loop-free, fp32. q,k [H, Dk], v [H, Dv], g, beta [H],
    state [H, Dk, Dv] updated in place. Returns o [H, Dv]."""
    s = state * g.exp().view(-1, 1, 1)
    memory = (k.unsqueeze(-1) * s).sum(-2)  # elementwise + reduce: no batched matmul of tiny shapes
    delta = beta.unsqueeze(-1) * (v - memory)
    s = s + k.unsqueeze(-1) * delta.unsqueeze(-2)
    state.copy_(s)
    return (q.unsqueeze(-1) * s).sum(-2)


def gated_delta_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """S tokens of the gated delta rule. q,k [S, H, Dk], v [S, H, Dv], g, beta [S, H]; returns [S, H, Dv]."""
    return torch.stack([gated_delta_step(q[t], k[t], v[t], g[t], beta[t], state) for t in range(q.shape[0])])


def attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_positions: torch.Tensor
) -> torch.Tensor:
    """Causal GQA attention of q [H, S, D] over cached keys/values [KVH, L, D] (cache slot = position).

    Key j is visible to the query at position p when j <= p, so slots past the written prefix are
    masked and a fixed-capacity cache needs no separate length. Softmax in fp32. Returns [S, H * D].
    """
    heads, seq, dim = q.shape
    kv_heads, length, _ = keys.shape
    qg = q.reshape(kv_heads, heads // kv_heads * seq, dim)
    scores = torch.matmul(qg, keys.transpose(1, 2)).float() * dim**-0.5  # [KVH, G*S, L]
    visible = torch.arange(length, device=q.device).view(1, -1) <= q_positions.view(-1, 1)  # [S, L]
    visible = visible.repeat(heads // kv_heads, 1).unsqueeze(0)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values).reshape(heads, seq, dim)
    return out.transpose(0, 1).reshape(seq, heads * dim)
