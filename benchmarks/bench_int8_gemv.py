"""int8 GEMV at Qwen3.5-2B decode shapes: bytes of weights read per second, in CUDA graph replay.

Variants per shape: bf16 F.linear (its own 2-byte weights), the reference dequantize + F.linear, the
same compiled by torch.compile, and the fused Triton kernel (int8 + fp16 scales). Each graph cycles
through enough weight copies to overflow L2, so small shapes are timed from device memory, not cache.
TB/s = weight bytes (int8 + scales, or bf16) per call / median time per call.

    python3 benchmarks/bench_int8_gemv.py [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import replayed_seconds  # noqa: E402
from lmbundle.engine.kernels import triton_gemv  # noqa: E402
from lmbundle.models.linear import int8_matmul as reference_int8_matmul  # noqa: E402

SHAPES = [  # (label, out_features, in_features)
    ("lm_head", 248320, 2048),
    ("mlp gate|up, gdn qkv", 6144, 2048),
    ("mlp down", 2048, 6144),
    ("attn q", 4096, 2048),
    ("gdn z|out, attn o", 2048, 2048),
    ("attn k|v", 512, 2048),
]
COMPILED_SHAPES = {"lm_head", "mlp gate|up, gdn qkv", "mlp down"}  # torch.compile costs ~10 s a shape
SWEEP = [  # BLOCK_N, BLOCK_G, num_warps, int8 -> fp32 by bits (else I2F)
    *itertools.product((8, 16, 32), (16, 32, 64), (4, 8), (True,)),
    (8, 32, 4, False), (16, 32, 4, False), (16, 32, 8, False),
]
L2_FLUSH_BYTES = 256 << 20  # a few times the H100's 50 MB L2
GRAPH_BYTES = 2e9  # weight bytes one replay reads: long enough that event overhead is noise
MAX_CALLS_PER_GRAPH = 96
TIMED_REPLAYS = 15


def int8_copies(out_features: int, in_features: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    count = max(1, math.ceil(L2_FLUSH_BYTES / (out_features * in_features)))
    return [
        (torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, device="cuda"),
         (torch.rand(out_features, in_features // 32, device="cuda") * 0.02 + 1e-3).half())
        for _ in range(count)
    ]


def _bf16_copies(out_features: int, in_features: int) -> list[torch.Tensor]:
    count = max(1, math.ceil(L2_FLUSH_BYTES / (2 * out_features * in_features)))
    return [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) for _ in range(count)]


def seconds_per_call(calls: list, bytes_per_call: int) -> float:
    """Median seconds of one call (benchmarks/timing.py), replays reading about GRAPH_BYTES."""
    return replayed_seconds(calls, bytes_per_call, GRAPH_BYTES, MAX_CALLS_PER_GRAPH, TIMED_REPLAYS)


def _int8_bytes(q: torch.Tensor, s: torch.Tensor) -> int:
    return q.numel() + 2 * s.numel()


def bench_shape(label, out_features, in_features, rows, compiled_fn, config, results):
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    dense = _bf16_copies(out_features, in_features)
    t_bf16 = seconds_per_call([lambda w=w: F.linear(x, w) for w in dense], 2 * out_features * in_features)
    del dense
    int8 = int8_copies(out_features, in_features)
    nbytes = _int8_bytes(*int8[0])
    variants = {"bf16 F.linear": (t_bf16, 2 * out_features * in_features)}
    if rows == 1:
        variants["dequant+linear"] = (seconds_per_call([lambda q=q, s=s: reference_int8_matmul(x, q, s)
                                                        for q, s in int8], nbytes), nbytes)
        if compiled_fn is not None and label in COMPILED_SHAPES:
            variants["compiled dequant+linear"] = (seconds_per_call([lambda q=q, s=s: compiled_fn(x, q, s)
                                                                     for q, s in int8], nbytes), nbytes)
    variants["triton int8 gemv"] = (seconds_per_call([lambda q=q, s=s: triton_gemv.int8_gemv(x, q, s, config)
                                                      for q, s in int8], nbytes), nbytes)
    for name, (seconds, size) in variants.items():
        _report(dict(shape=label, out=out_features, inp=in_features, rows=rows, variant=name,
                            us=seconds * 1e6, tbps=size / seconds / 1e12, vs_bf16=t_bf16 / seconds), results)


def bench_swiglu(results):
    """Gate and up of the MLP: one fused pass vs two GEMVs + silu*mul vs bf16."""
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    dense = _bf16_copies(2 * 6144, 2048)
    t_bf16 = seconds_per_call([lambda w=w: F.silu(F.linear(x, w[:6144])) * F.linear(x, w[6144:]) for w in dense],
                              2 * 2 * 6144 * 2048)
    del dense
    int8 = int8_copies(2 * 6144, 2048)
    halves = [(q[:6144], s[:6144], q[6144:], s[6144:]) for q, s in int8]
    nbytes = _int8_bytes(*int8[0])
    two = seconds_per_call([lambda h=h: F.silu(triton_gemv.int8_gemv(x, h[0], h[1])) * triton_gemv.int8_gemv(x, h[2], h[3])
                            for h in halves], nbytes)
    fused = seconds_per_call([lambda h=h: triton_gemv.int8_swiglu(x, *h) for h in halves], nbytes)
    for name, seconds, size in [("bf16 2x linear+silu*mul", t_bf16, 2 * 2 * 6144 * 2048),
                                ("triton 2x gemv+silu*mul", two, nbytes), ("triton fused swiglu", fused, nbytes)]:
        _report(dict(shape="swiglu gate+up", out=2 * 6144, inp=2048, rows=1, variant=name,
                     us=seconds * 1e6, tbps=size / seconds / 1e12, vs_bf16=t_bf16 / seconds), results)


def _report(row: dict, results: list[dict]) -> None:
    results.append(row)
    print(f"{row['shape']:22s} {row['out']:>6d}x{row['inp']:<5d} {row['rows']:>2d} {row['variant']:25s} "
          f"{row['us']:9.1f} {row['tbps']:6.2f} {row['vs_bf16']:7.2f}", flush=True)


def copy_tbps() -> float:
    """The ceiling: a 1 GiB device-to-device copy, bytes read + written."""
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    nbytes = 2 * 2 * src.numel()
    return nbytes / seconds_per_call([lambda: dst.copy_(src)], nbytes) / 1e12


def sweep(results) -> dict[str, tuple]:
    """Time every config of SWEEP on every shape, one row of x; print and return the best by shape."""
    best_configs = {}
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    for label, out_features, in_features in SHAPES:
        int8 = int8_copies(out_features, in_features)
        xs = x if in_features == 2048 else torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        nbytes = _int8_bytes(*int8[0])
        default_config = triton_gemv.pick_config(out_features, in_features)
        for config in dict.fromkeys([default_config, *SWEEP]):
            seconds = seconds_per_call([lambda q=q, s=s: triton_gemv.int8_gemv(xs, q, s, config=config)
                                        for q, s in int8], nbytes)
            results.append(dict(shape=label, config=config, us=seconds * 1e6, tbps=nbytes / seconds / 1e12))
        del int8
        best = sorted((r for r in results if r["shape"] == label), key=lambda r: r["us"])
        default = next(r for r in best if r["config"] == default_config)
        print(f"sweep {label:22s} default {default['tbps']:.2f}; best "
              + "  ".join(f"{r['config']}:{r['tbps']:.2f}" for r in best[:5]), flush=True)
        best_configs[label] = best[0]["config"]
    return best_configs


def _header() -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}, "
            f"CUDA {torch.version.cuda}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="time the kernel's block configs first, then use each shape's best")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(_header(), flush=True)
    print(f"device copy {copy_tbps():.2f} TB/s (read + write)", flush=True)
    results: list[dict] = []
    configs = sweep(results) if args.sweep else {}
    compiled_fn = None if args.no_compile else torch.compile(reference_int8_matmul, dynamic=False)
    print(f"{'shape':22s} {'out x in':>12s} {'M':>2s} {'variant':25s} {'us':>9s} {'TB/s':>6s} {'x bf16':>7s}")
    for rows in (1, 4):
        for label, out_features, in_features in SHAPES:
            bench_shape(label, out_features, in_features, rows, compiled_fn, configs.get(label), results)
    bench_swiglu(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=_header(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
