"""The batched decode step on CUDA (`lmbundle serve --max-batch N`): ms per step and tok/s with B of the
scheduler's rows live, for the fused rows kernels (`kernels/triton_rows.py`) and optionally the reference
ops (`BatchOps`, the step before them), each replayed as the scheduler's one CUDA graph.

Builds a random-weight checkpoint at a real config (as bench_decode.py), converts it, starts an engine
with `--max-batch` rows and drives its scheduler's graph directly: B rows live at `--position`, the
padding rows at position 0. `--sweep` also times the rows linear's block configs at the 2B's shapes.
  python benchmarks/bench_batch_step.py --config Qwen3.5-2B --quant int8hu --max-batch 32 --reference --sweep
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode import make_checkpoint  # noqa: E402
from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.batch import ROW_TILE, BatchOps  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.engine.kernels.triton_rows import RowStepOps  # noqa: E402


def time_step(sched, live: int, position: int, steps: int) -> float:
    """Seconds per replay of the scheduler's graph with `live` rows at `position`."""
    for t in (sched._ids_in, sched._positions_in, sched._live_in):
        t.zero_()
    sched._ids_in[:live] = torch.arange(1, live + 1)
    sched._positions_in[:live] = position
    sched._live_in[:live] = 1
    graph, _ = sched._graph or sched._capture(sched.capacity)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def sweep(rows: int) -> None:
    """The rows linear's block configs at the Qwen3.5-2B's int8 shapes, `rows` rows."""
    import triton.testing

    from lmbundle.engine.kernels.triton_rows import pick_config, rows_linear
    from lmbundle.models.linear import dequantize
    from lmbundle.models.ops import Norm

    def int8(out_features, in_features):
        return (torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, device="cuda"),
                torch.rand(out_features, in_features // 32, device="cuda").half() * 0.01)

    norm = Norm(torch.zeros(2048, device="cuda", dtype=torch.bfloat16), 1e-6, True)
    shapes = {  # name: (out, in, fusion)
        "gdn in_proj + norm": (8224, 2048, "norm"),
        "gate/up + norm + swiglu": (6144, 2048, "swiglu"),
        "down + residual": (2048, 6144, "residual"),
        "out_proj + residual": (2048, 2048, "residual"),
        "head + norm": (248320, 2048, "norm"),
    }
    for name, (out_features, in_features, kind) in shapes.items():
        w, s = int8(out_features, in_features)
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        if kind == "swiglu":
            w2, s2 = int8(out_features, in_features)
            extra = dict(weight2=w2, scales2=s2, norm=norm)
        elif kind == "residual":
            extra = dict(residual=torch.randn(rows, out_features, device="cuda", dtype=torch.bfloat16))
        else:
            extra = dict(norm=norm)
        weight_bytes = w.numel() * (2 if kind == "swiglu" else 1) * (1 + 2 / 32)
        picked = pick_config(rows, out_features, in_features, kind == "swiglu")
        block_ns = (64, 128, 256) if out_features > 65536 else (16, 32, 64)
        results = []
        for block_n in block_ns:
            for block_k in (64, 128, 256):
                for warps in (4, 8):
                    for stages in (2, 3, 4):  # offline, the picked 3 stages take 99-116 KB of shared memory
                        config = (picked[0], block_n, block_k, warps, stages)
                        try:
                            ms = triton.testing.do_bench(lambda: rows_linear(x, w, s, config=config, **extra))
                        except Exception as exc:  # a config that does not compile (registers, shared memory)
                            print(f"  {name} {config}: {type(exc).__name__}")
                            continue
                        results.append((ms, config))
        results.sort()
        base = triton.testing.do_bench(lambda: rows_linear(x, w, s, **extra))
        # what the default (reference) batched step does instead: cuBLAS on a dense bf16 copy
        dense = [dequantize(w, s, torch.bfloat16)] + ([dequantize(w2, s2, torch.bfloat16)] if kind == "swiglu" else [])
        cublas = triton.testing.do_bench(lambda: [torch.nn.functional.linear(x, d) for d in dense])
        print(f"{name} {out_features}x{in_features} rows={rows}: picked {picked} {base * 1e3:.1f} us "
              f"({weight_bytes / base / 1e6:.0f} GB/s); cuBLAS on dense bf16 {cublas * 1e3:.1f} us; best " + ", ".join(
                  f"{c} {ms * 1e3:.1f} us" for ms, c in results[:3]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="Qwen3.5-2B")
    parser.add_argument("--quant", default="int8hu")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--live", default="1,8,32")
    parser.add_argument("--position", type=int, nargs="+", default=[512])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reference", action="store_true", help="also the reference ops (BatchOps)")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ckpt = make_checkpoint(Path(tmp) / "ckpt", args.config, torch.device("cuda"))
        bundle = convert(str(ckpt), Path(tmp) / "b", quant=args.quant, backend="torch", max_context=args.context,
                         log=None)
        engine = Engine(bundle, backend="torch", device="cuda", max_batch=args.max_batch, cache_bytes=0)
        sched = engine.scheduler
        variants = [("rows kernels", RowStepOps(sched._live_in))]
        if args.reference:  # the scheduler's default
            variants.append(("reference", BatchOps(-(-args.max_batch // ROW_TILE) * ROW_TILE, dense=True)))
        try:
            for label, ops in variants:
                sched.ops, sched._graph = ops, None
                for live in map(int, args.live.split(",")):
                    for position in args.position:
                        ms = time_step(sched, live, position, args.steps) * 1e3
                        print(f"{args.config} {args.quant} {label}: {live}/{args.max_batch} rows live at position "
                              f"{position}: {ms:.3f} ms/step, {live / ms * 1e3:.0f} tok/s", flush=True)
                sched._graph = None
                torch.cuda.empty_cache()
        finally:
            engine.close()
    if args.sweep:
        sweep(args.max_batch)


if __name__ == "__main__":
    main()
