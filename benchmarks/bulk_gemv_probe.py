"""Probe (issue 17): does an int8 GEMV fed by Hopper's bulk copy engine stream the 2B's decode weights faster
than our Triton GEMV?

The Triton GEMV (`lmbundle/engine/kernels/triton_gemv.py`) reaches 1.6-2.0 TB/s on the 4-25 MB weights of a
decode step and 2.7-3.0 on the 1 GB head (`RESULTS.md`, 2026-11-28 sweep): each program holds its tile and the
next in registers, so the bytes in flight per SM stay small. `bulk_gemv/bulk_gemv.cu` keeps 2-4 blocks of
4-16 rows (up to 200 KB) in flight per CTA through `cp.async.bulk` copies into shared memory. This script
builds it with torch's extension loader (nvcc, sm_90), checks it against the reference, and times both
kernels the same way as `bench_int8_gemv.py`: graph replays over enough weight copies to overflow L2.
Then the decode step's 97 GEMVs in order as one graph with each kernel (each shape's best bulk config):
launch gaps included, the figure the step's 1.18 ms of GEMV time compares with. Nothing of lmbundle uses
the kernel; the figures decide whether a CUDA C++ GEMV is worth building.

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


def configs(in_features: int, sms: int) -> list[tuple[int, int, int]]:
    """(rows, stages, ctas) the .cu builds for this K."""
    rows_stages = [(r, s) for r, s in itertools.product((4, 8, 16), (2, 3, 4))
                   if in_features == 2048 or r < 16 or s == 2]
    return [(r, s, sms * m) for (r, s), m in itertools.product(rows_stages, (1, 2, 4))]


def step_chain(module, best: dict[tuple[int, int], tuple[int, int, int]]) -> dict:
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
    print(f"decode step's {len(calls)} GEMVs ({nbytes / 1e9:.2f} GB) as one graph: triton {triton_us:.0f} us "
          f"({nbytes / triton_us / 1e6:.2f} TB/s), bulk {bulk_us:.0f} us ({nbytes / bulk_us / 1e6:.2f} TB/s)",
          flush=True)
    return dict(gemvs=len(calls), bytes=nbytes, triton_us=round(triton_us, 1), bulk_us=round(bulk_us, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(_header(), flush=True)
    module = build()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device copy {copy_tbps():.2f} TB/s (read + write)", flush=True)
    results, best_by_shape = [], {}
    for label, out_features, in_features in SHAPES:
        copies = int8_copies(out_features, in_features)
        nbytes = _int8_bytes(*copies[0])
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        q, s = copies[0]
        exact = F.linear(x.double(), dequantize(q, s, torch.float64)).view(-1)
        triton_us = seconds_per_call([lambda q=q, s=s: triton_gemv.int8_gemv(x, q, s) for q, s in copies], nbytes) * 1e6
        timed = {}
        for rows, stages, ctas in configs(in_features, sms):
            ours = module.gemv(x.view(-1), q, s, rows, stages, ctas).double()
            error = ((ours - exact).norm() / exact.norm()).item()
            if error > 1e-2:  # bf16 output: ~4e-3
                print(f"{label} {rows}x{stages}x{ctas}: WRONG, relative error {error:.3g}", flush=True)
                continue
            timed[(rows, stages, ctas)] = seconds_per_call(
                [lambda q=q, s=s, c=(rows, stages, ctas): module.gemv(x.view(-1), q, s, *c) for q, s in copies],
                nbytes) * 1e6
        best = min(timed, key=timed.get) if timed else None
        if best:
            best_by_shape[(out_features, in_features)] = best
        row = dict(shape=label, out=out_features, inp=in_features, bytes=nbytes, triton_us=round(triton_us, 2),
                   bulk_us={f"{r}x{s}x{c}": round(t, 2) for (r, s, c), t in timed.items()},
                   best=list(best) if best else None)
        results.append(row)
        if best:
            print(f"{label:16s} {out_features:>6d}x{in_features:<5d} triton {triton_us:7.1f} us "
                  f"({nbytes / triton_us / 1e6:.2f} TB/s)  bulk best {timed[best]:7.1f} us "
                  f"({nbytes / timed[best] / 1e6:.2f} TB/s, rows x stages x CTAs {best})  "
                  f"x{triton_us / timed[best]:.2f}", flush=True)
        del copies
    chain = step_chain(module, best_by_shape) if len(best_by_shape) == len(SHAPES) else None
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=_header(), command=" ".join(["python3", *sys.argv]),
                                                   results=results, step_chain=chain), indent=1))


if __name__ == "__main__":
    main()
