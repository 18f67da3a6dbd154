"""The batched decode step on CUDA (`lmbundle serve --max-batch N`): ms per step and tok/s with B of the
scheduler's rows live, for its default ops (cuBLAS GEMMs on dense weights with the rows kernels of
`kernels/triton_rows.py` between them) and optionally the reference ops alone (`BatchOps`), each replayed
as the scheduler's one CUDA graph; `--profile` prints each one's kernels.

Builds a random-weight checkpoint at a real config (as bench_decode.py), converts it, starts an engine
with `--max-batch` rows and drives its scheduler's graph directly: B rows live at `--position`, the
padding rows at position 0.
  python benchmarks/bench_batch_step.py --config Qwen3.5-2B --quant int8hu --max-batch 32 --reference --profile
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
from benchmarks.profile_step import print_kernels  # noqa: E402
from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.batch_ops import ROW_TILE, BatchOps  # noqa: E402
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


def profile(sched, position: int, steps: int = 5) -> None:
    """The step's kernels with every row live at `position`, run eagerly (a graph replay hides them)."""
    rows = sched.max_batch
    sched._ids_in[:] = torch.arange(1, rows + 1)
    sched._positions_in[:] = position
    sched._live_in[:] = 1
    state = sched.pool.rows_of(rows)
    step = lambda: sched.model.step_rows(sched._ids_in, sched._positions_in, state, sched.capacity, sched.ops)  # noqa: E731
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print_kernels(prof, steps, f"{rows} rows live at position {position}, eager, per step", top=25)


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
    parser.add_argument("--profile", action="store_true", help="kernel times of each variant's step, all rows live")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ckpt = make_checkpoint(Path(tmp) / "ckpt", args.config, torch.device("cuda"))
        bundle = convert(str(ckpt), Path(tmp) / "b", quant=args.quant, backend="torch", max_context=args.context,
                         log=None)
        engine = Engine(bundle, backend="torch", device="cuda", max_batch=args.max_batch, cache_bytes=0)
        sched = engine.scheduler
        linears = BatchOps(-(-args.max_batch // ROW_TILE) * ROW_TILE, dense=True)
        variants = [("rows kernels", RowStepOps(sched._live_in, linears))]  # the scheduler's default
        if args.reference:  # LMBUNDLE_ROW_KERNELS=0
            variants.append(("reference", linears))
        try:
            for label, ops in variants:
                sched.ops, sched._graph = ops, None
                for live in map(int, args.live.split(",")):
                    for position in args.position:
                        ms = time_step(sched, live, position, args.steps) * 1e3
                        print(f"{args.config} {args.quant} {label}: {live}/{args.max_batch} rows live at position "
                              f"{position}: {ms:.3f} ms/step, {live / ms * 1e3:.0f} tok/s", flush=True)
                if args.profile:
                    profile(sched, args.position[-1])
                sched._graph = None
                torch.cuda.empty_cache()
        finally:
            engine.close()


if __name__ == "__main__":
    main()
