"""A Triton kernel for prompt chunks: the sequential part of the GDN's chunked (WY) delta rule.

`layers.gated_delta_chunk` does each chunk's parallel part as batched matmuls over all heads and chunks
(`wy_chunks`), then walks the chunks in order (`wy_recurrence`): four small matmuls a chunk. On the H200 a
2,048-token prompt of the 2B spent 10.2 ms of its 47.8 ms in those walks, 1,152 matmul launches of
fp32 FFMA (`benchmarks/results/20261201T233000Z-profile-prefill.txt`). `wy_recurrence` here is one
launch per layer: a program per (head, block of value columns) keeps its slice of the state in
registers across all the chunks. Products on the tensor cores as three TF32 products (`tf32x3`: about
fp32's accuracy; the reference's matmuls are fp32). Compiled offline for sm_90 (tests/kernels_compile.py)
at chunks of 32, one stage, 4 warps: 16 KB of shared memory, 255 registers and 56 bytes of spills; at
chunks of 64, or with fp32 FMA products ("ieee"), the spills grew to 0.2-5.7 KB. Not yet timed on a GPU:
`TritonStepOps` uses it with LMBUNDLE_WY_KERNEL=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmbundle.models.layers import WYChunks
from lmbundle.models.layers import wy_recurrence as reference_recurrence


@triton.jit
def _wy_recurrence_kernel(wv_ptr, wk_ptr, qd_ptr, scores_ptr, ke_ptr, decay_ptr, state_ptr, out_ptr, chunks,
                          C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """Program (head, block of BV value columns): for each chunk, U = w_v - w_k S; out = q_decayed S +
    scores U; S = e^{G_C} S + k_to_end^T U. S [DK, BV] stays in registers; stored once at the end. The
    head's chunks are read through block pointers (no per-element offsets held in registers)."""
    head = tl.program_id(0)
    col = tl.program_id(1) * BV
    rows = chunks * C
    by_key = head.to(tl.int64) * rows * DK
    by_value = head.to(tl.int64) * rows * DV

    wk = tl.make_block_ptr(wk_ptr + by_key, (rows, DK), (DK, 1), (0, 0), (C, DK), (1, 0))
    qd = tl.make_block_ptr(qd_ptr + by_key, (rows, DK), (DK, 1), (0, 0), (C, DK), (1, 0))
    ke = tl.make_block_ptr(ke_ptr + by_key, (rows, DK), (DK, 1), (0, 0), (C, DK), (1, 0))
    wv = tl.make_block_ptr(wv_ptr + by_value, (rows, DV), (DV, 1), (0, col), (C, BV), (1, 0))
    out = tl.make_block_ptr(out_ptr + by_value, (rows, DV), (DV, 1), (0, col), (C, BV), (1, 0))
    scores = tl.make_block_ptr(scores_ptr + head.to(tl.int64) * rows * C, (rows, C), (C, 1), (0, 0), (C, C), (1, 0))
    state = tl.make_block_ptr(state_ptr + head.to(tl.int64) * DK * DV, (DK, DV), (DV, 1), (0, col), (DK, BV), (1, 0))
    s = tl.load(state)
    for c in range(chunks):
        u = tl.load(wv) - tl.dot(tl.load(wk), s, input_precision="tf32x3")
        o = tl.dot(tl.load(qd), s, input_precision="tf32x3")
        o = tl.dot(tl.load(scores), u, o, input_precision="tf32x3")
        tl.store(out, o)
        s = s * tl.load(decay_ptr + head * chunks + c)
        s = tl.dot(tl.trans(tl.load(ke)), u, s, input_precision="tf32x3")
        wk = tl.advance(wk, (C, 0))
        qd = tl.advance(qd, (C, 0))
        ke = tl.advance(ke, (C, 0))
        scores = tl.advance(scores, (C, 0))
        wv = tl.advance(wv, (C, 0))
        out = tl.advance(out, (C, 0))
    tl.store(state, s)


def wy_recurrence(chunks: WYChunks, state: torch.Tensor, block_v: int = 16) -> torch.Tensor:
    """`layers.wy_recurrence` as one launch: state [H, Dk, Dv] (fp32) updated in place; returns
    [H, N, C, Dv]. Shapes the kernel does not tile (dims not powers of two of at least 16) take the
    reference."""
    heads, n, chunk, dk = chunks.w_k.shape
    dv = chunks.w_v.shape[-1]
    if not (all(x >= 16 and x & (x - 1) == 0 for x in (chunk, dk, dv)) and state.dtype == torch.float32
            and state.is_contiguous()):
        return reference_recurrence(chunks, state)
    block_v = min(block_v, dv)
    out = torch.empty(heads, n, chunk, dv, dtype=torch.float32, device=state.device)
    w_v, w_k, q_decayed, scores, k_to_end, decay = (x.float().contiguous() for x in chunks)
    _wy_recurrence_kernel[(heads, dv // block_v)](w_v, w_k, q_decayed, scores, k_to_end, decay, state, out, n,
                                                  C=chunk, DK=dk, DV=dv, BV=block_v, num_warps=4, num_stages=1)
    return out
