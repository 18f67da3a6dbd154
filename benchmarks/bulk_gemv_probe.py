"""Probe (issue 17): does an int8 GEMV fed by Hopper's bulk copy engine stream the 2B's decode weights faster
than our Triton GEMV?

The Triton GEMV (`lmbundle/engine/kernels/triton_gemv.py`) reaches 1.6-2.0 TB/s on the 4-25 MB weights of a
decode step and 2.7-3.0 on the 1 GB head (`RESULTS.md`, 2026-11-28 sweep): each program holds its tile and the
next in registers, so the bytes in flight per SM stay small. `bulk_gemv/bulk_gemv.cu` keeps 2-4 blocks of
4-16 rows (up to 200 KB) in flight per CTA through `cp.async.bulk` copies into shared memory. This script
builds it with torch's extension loader (nvcc, sm_90), checks it against the reference, and times both
kernels the same way as `bench_int8_gemv.py`: graph replays over enough weight copies to overflow L2.
Beside it, the Triton way to the same bytes in flight: a plain int8 GEMV whose loop Triton's software
pipeliner turns into `cp.async` copies into 3-6 shared-memory stages (`tl.range(num_stages=)`; the
lmbundle GEMV double-buffers its tiles in registers instead). Then the decode step's 97 GEMVs in order as
one graph with each kernel (each shape's best config): launch gaps included, the figure the step's 1.18 ms
of GEMV time compares with. Nothing of lmbundle uses these kernels; the figures decide whether either is
worth building the fused decode GEMVs on.

    python3 benchmarks/bulk_gemv_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_int8_gemv import _header, _int8_bytes, copy_tbps, int8_copies, seconds_per_call  # noqa: E402
from lmbundle.engine.kernels import triton_gemv  # noqa: E402
from lmbundle.models.linear import dequantize  # noqa: E402

SHAPES = [  # (label, out_features, in_features): the 2B's decode GEMVs, projections fused
    ("gdn in_proj", 8224, 2048), ("mlp gate+up", 12288, 2048), ("mlp down", 2048, 6144),
    ("attn qkv", 5120, 2048), ("gdn out, attn o", 2048, 2048), ("head", 248320, 2048),
]
WRAPPER = """
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

extern "C" int bulk_gemv_launch(const void*, const void*, const void*, void*, int, int, int, int, int, cudaStream_t);

torch::Tensor gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t rows, int64_t stages, int64_t ctas) {
    auto y = torch::empty({q.size(0)}, x.options());
    int status = bulk_gemv_launch(q.data_ptr(), s.data_ptr(), x.data_ptr(), y.data_ptr(), q.size(0), q.size(1),
                                  rows, stages, ctas, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == 0, "bulk_gemv_launch returned ", status);
    return y;
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    source = (Path(__file__).parent / "bulk_gemv" / "bulk_gemv.cu").read_text()
    return load_inline("bulk_gemv_probe", cpp_sources=WRAPPER, cuda_sources=source, functions=["gemv"],
                       extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"], verbose=False)


@triton.jit
def _pipelined_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, num_rows, num_groups, BLOCK_N: tl.constexpr,
                           BLOCK_G: tl.constexpr, STAGES: tl.constexpr):
    """y[rows] = x @ (W * s).T for a [BLOCK_N, BLOCK_G, 32] int8 tile a step, loads pipelined by Triton."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, 32)
    row_ok = rows < num_rows
    w_offsets = rows[:, None, None].to(tl.int64) * num_groups * 32 + groups[None, :, None] * 32 + cols[None, None, :]
    s_offsets = rows[:, None].to(tl.int64) * num_groups + groups[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in tl.range(0, num_groups, BLOCK_G, num_stages=STAGES):
        w = tl.load(w_ptr + w_offsets + g0 * 32, mask=row_ok[:, None, None], other=0)
        scale = tl.load(s_ptr + s_offsets + g0, mask=row_ok[:, None], other=0.0).to(tl.float32)
        h = tl.load(x_ptr + g0 * 32 + groups[:, None] * 32 + cols[None, :]).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * h[None, :, :], axis=2) * scale
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


def pipelined_gemv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block_n: int, block_g: int, stages: int,
                   num_warps: int) -> torch.Tensor:
    """x [in] -> [out]; in_features a multiple of 32 * block_g (the 2B's are)."""
    y = torch.empty(q.shape[0], dtype=x.dtype, device=x.device)
    _pipelined_gemv_kernel[(triton.cdiv(q.shape[0], block_n),)](x, q, s, y, q.shape[0], q.shape[1] // 32,
                                                                 BLOCK_N=block_n, BLOCK_G=block_g, STAGES=stages,
                                                                 num_warps=num_warps, num_stages=stages)
    return y


PIPELINED = [(n, g, st, 4) for n, g, st in itertools.product((8, 16, 32), (8, 16), (3, 4, 6))] + [
    (16, 16, 4, 8), (32, 16, 4, 8), (32, 32, 3, 8)]  # (BLOCK_N, BLOCK_G, stages, warps)


def configs(in_features: int, sms: int) -> list[tuple[int, int, int]]:
    """(rows, stages, ctas) the .cu builds for this K."""
    rows_stages = [(r, s) for r, s in itertools.product((4, 8, 16), (2, 3, 4))
                   if in_features == 2048 or r < 16 or s == 2]
    return [(r, s, sms * m) for (r, s), m in itertools.product(rows_stages, (1, 2, 4))]


def step_chain(module, best: dict[tuple[int, int], tuple[int, int, int]],
               best_pipelined: dict[tuple[int, int], tuple[int, int, int, int]]) -> dict:
    """The 2B's decode step as GEMVs alone, in order (18 GDN + 6 attention layers, then the head: 97 GEMVs,
    1.9 GB), captured as one graph per kernel: what the step's GEMV time would be, launch gaps included."""
    shapes = []
    for mixer_rows in [8224, 8224, 8224, 5120] * 6:  # GDN in_proj x3, attention qkv; then out/o, MLP
        shapes += [(mixer_rows, 2048), (2048, 2048), (12288, 2048), (2048, 6144)]
    shapes.append((248320, 2048))
    xs = {k: torch.randn(k, device="cuda", dtype=torch.bfloat16) for k in (2048, 6144)}
    calls = [(shape, torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda"),
              (torch.rand(shape[0], shape[1] // 32, device="cuda") * 0.02 + 1e-3).half()) for shape in shapes]
    nbytes = sum(_int8_bytes(q, s) for _, q, s in calls)

    def run(kernel) -> float:
        for shape, q, s in calls:  # compile / configure outside the capture
            kernel(shape, q, s)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for shape, q, s in calls:
                kernel(shape, q, s)
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return sorted(times)[len(times) // 2]

    triton_us = run(lambda shape, q, s: triton_gemv.int8_gemv(xs[shape[1]].view(1, -1), q, s))
    bulk_us = run(lambda shape, q, s: module.gemv(xs[shape[1]], q, s, *best[shape]))
    pipelined_us = run(lambda shape, q, s: pipelined_gemv(xs[shape[1]], q, s, *best_pipelined[shape]))
    print(f"decode step's {len(calls)} GEMVs ({nbytes / 1e9:.2f} GB) as one graph: triton {triton_us:.0f} us "
          f"({nbytes / triton_us / 1e6:.2f} TB/s), bulk {bulk_us:.0f} us ({nbytes / bulk_us / 1e6:.2f} TB/s), "
          f"triton pipelined {pipelined_us:.0f} us ({nbytes / pipelined_us / 1e6:.2f} TB/s)", flush=True)
    return dict(gemvs=len(calls), bytes=nbytes, triton_us=round(triton_us, 1), bulk_us=round(bulk_us, 1),
                pipelined_us=round(pipelined_us, 1))


def _checked_times(label: str, kernel, configs: list[tuple], x, copies, exact, nbytes: int) -> dict:
    """us per call of kernel(x, q, s, *config) for each config whose output matches the exact product."""
    q, s = copies[0]
    timed = {}
    for config in configs:
        error = ((kernel(x, q, s, *config).double() - exact).norm() / exact.norm()).item()
        if error > 1e-2:  # bf16 output: ~4e-3
            print(f"{label} {config}: WRONG, relative error {error:.3g}", flush=True)
            continue
        timed[config] = seconds_per_call([lambda q=q, s=s: kernel(x, q, s, *config) for q, s in copies], nbytes) * 1e6
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(_header(), flush=True)
    module = build()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device copy {copy_tbps():.2f} TB/s (read + write)", flush=True)
    results, best_by_shape, best_pipelined = [], {}, {}
    for label, out_features, in_features in SHAPES:
        copies = int8_copies(out_features, in_features)
        nbytes = _int8_bytes(*copies[0])
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        exact = F.linear(x.double(), dequantize(*copies[0], torch.float64)).view(-1)
        triton_us = seconds_per_call([lambda q=q, s=s: triton_gemv.int8_gemv(x, q, s) for q, s in copies], nbytes) * 1e6
        bulk = _checked_times(label, module.gemv, configs(in_features, sms), x.view(-1), copies, exact, nbytes)
        pipelined = _checked_times(label, pipelined_gemv, PIPELINED, x.view(-1), copies, exact, nbytes)
        shape = (out_features, in_features)
        row = dict(shape=label, out=out_features, inp=in_features, bytes=nbytes, triton_us=round(triton_us, 2))
        line = (f"{label:16s} {out_features:>6d}x{in_features:<5d} triton {triton_us:7.1f} us "
                f"({nbytes / triton_us / 1e6:.2f} TB/s)")
        for name, timed, best in (("bulk", bulk, best_by_shape), ("pipelined", pipelined, best_pipelined)):
            row[f"{name}_us"] = {"x".join(map(str, c)): round(t, 2) for c, t in timed.items()}
            if timed:
                best[shape] = min(timed, key=timed.get)
                row[f"{name}_best"] = list(best[shape])
                line += (f"  {name} {timed[best[shape]]:7.1f} us ({nbytes / timed[best[shape]] / 1e6:.2f} TB/s, "
                         f"{best[shape]}) x{triton_us / timed[best[shape]]:.2f}")
        results.append(row)
        print(line, flush=True)
        del copies
    chain = (step_chain(module, best_by_shape, best_pipelined)
             if len(best_by_shape) == len(best_pipelined) == len(SHAPES) else None)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=_header(), command=" ".join(["python3", *sys.argv]),
                                                   results=results, step_chain=chain), indent=1))


if __name__ == "__main__":
    main()
