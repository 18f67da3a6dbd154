"""The batched decode step on CUDA (`lmbundle serve --max-batch N`): ms per step and tok/s with B of the
scheduler's rows live, side by side for its ops variants, each replayed as the scheduler's one CUDA graph,
against the bytes-per-step ceiling; `--sweep` tunes the kernels first, `--profile` prints each variant's kernels.

Variants (`--variants`): `dense` = the rows kernels of `kernels/triton_rows.py` around cuBLAS GEMMs on 16-bit
copies of the weights (`BatchOps`); `int8` = the int8 rows linear (`kernels/triton_rows_linear.py`: int8
weights read as int8, residual add and SwiGLU fused); `+pdl` = every Triton kernel a programmatic dependent
launch; `--reference` adds the reference ops alone. The ceiling: the bytes a step must move (the weights
once as stored, each live row's GDN state read and written, its KV prefix read, its fp32 logits) at the
device-to-device copy rate measured in the same run.

`--sweep` (`sweep_rows_kernels.py`) times every candidate block size of the int8 linear and of the rows
kernels at the 2B's shapes and R = 1, 8, 16, 32, 64 and applies the winners, so the variants run twice:
with the table as committed, then as swept (`--write-table` also rewrites `kernels/rows_tuning.py`). Then
exactness on the GPU: each variant's row 0 alone (the others padding) against all rows live, bit for bit,
and every variant's greedy tokens against `dense`'s. Everything goes into one JSON in --results-dir (and
$OUT when set).

Builds a random-weight checkpoint at a real config (as bench_decode.py), converts it, starts an engine
with `--max-batch` rows and drives its scheduler's graph directly: B rows live at `--position`, the
padding rows at position 0.
  python3 benchmarks/bench_batch_step.py --config Qwen3.5-2B --quant int8hu --max-batch 32 --sweep --write-table \
      --profile --max-seconds 390
(--max-seconds bounds the run: the sweep gets what the build and the first variants leave, less ~2 minutes for
the swept variants, exactness and the summary.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import sweep_rows_kernels  # noqa: E402
from benchmarks.bench_decode import make_checkpoint  # noqa: E402
from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.batch_ops import ROW_TILE, BatchOps  # noqa: E402
from lmbundle.engine.bench import measured_bandwidth  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.engine.kernels import rows_tuning  # noqa: E402
from lmbundle.engine.kernels.triton_rows import RowStepOps  # noqa: E402
from lmbundle.models.linear import Linear  # noqa: E402


def set_rows(sched, live: int, position: int) -> None:
    """The graph's inputs: rows 0..live-1 at `position` with distinct tokens, the rest padding."""
    for t in (sched._ids_in, sched._positions_in, sched._live_in):
        t.zero_()
    sched._ids_in[:live] = torch.arange(1, live + 1)
    sched._positions_in[:live] = position
    sched._live_in[:live] = 1


def time_step(sched, live: int, position: int, steps: int) -> float:
    """Seconds per replay of the scheduler's graph with `live` rows at `position` (best of 3 runs)."""
    set_rows(sched, live, position)
    graph, _ = sched._graph or sched._capture(sched.capacity)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def step_bytes(model, live: int, position: int) -> dict[str, int]:
    """What a step must move: the weights once as stored (int8 + scales, or 16-bit), each live row's GDN state
    read and written and its KV prefix read (`StateSpec.bytes_per_token`), its logits written in fp32."""
    weights = sum(m.qweight.numel() + 2 * m.scales.numel() if m.quantized
                  else m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))
    state = model.state_spec.bytes_per_token(model.model.embed_tokens.weight.element_size())
    return {"weights": weights, "gdn_state": live * state["gdn_state"],
            "kv": live * (position + 1) * state["kv_per_position"], "logits": live * model.cfg.vocab_size * 4}


def make_ops(sched, variant: str, kept) -> RowStepOps | BatchOps:
    linears = BatchOps(-(-sched.max_batch // ROW_TILE) * ROW_TILE, dense=True, kept=kept)
    if variant == "reference":
        return linears
    return RowStepOps(sched._live_in, linears, devices=(sched.device.type,), int8_linears=variant.startswith("int8"),
                      pdl="pdl" in variant)


def kernels(sched, position: int, label: str, runs: int = 5, top: int = 25) -> list[dict]:
    """The step's kernels with every row live at `position`, run eagerly (a graph replay hides them)."""
    set_rows(sched, sched.max_batch, position)
    state = sched.pool.rows_of(sched.max_batch)
    saved = [t.clone() for t in state.tensors().values()]

    def step():
        return sched.model.step_rows(sched._ids_in, sched._positions_in, state, sched.capacity, sched.ops)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
    for t, s in zip(state.tensors().values(), saved):
        t.copy_(s)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [{"kernel": e.key, "ms": e.self_device_time_total / runs / 1e3, "count": e.count // runs} for e in events]
    print(f"{label}: {sched.max_batch} rows live at position {position}, eager, per step: kernel time "
          f"{sum(r['ms'] for r in rows):.3f} ms in {sum(r['count'] for r in rows)} kernels", flush=True)
    for r in rows[:top]:
        print(f"  {r['ms']:7.3f} ms  {r['count']:5d}x  {r['kernel'][:100]}", flush=True)
    return rows


def logits_of(sched, live: int, position: int, snapshot: list[torch.Tensor]) -> torch.Tensor:
    """One replay from the saved pool state with `live` rows at `position`: the logits of those rows."""
    for t, s in zip(sched.pool.tensors().values(), snapshot):
        t.copy_(s)
    set_rows(sched, live, position)
    graph, out = sched._graph or sched._capture(sched.capacity)
    graph.replay()
    torch.cuda.synchronize()
    return out[:live].clone()


def time_variants(sched, kept, which: list[str], suffix: str, args, copy_rate: float, results: dict) -> None:
    """Each variant's step at every live count and position (and its kernels with --profile) into results."""
    for variant in which:
        label = variant + suffix
        try:
            sched.ops, sched._graph = make_ops(sched, variant, kept), None
            for live in args.live_counts:
                for position in args.position:
                    ms = time_step(sched, live, position, args.steps) * 1e3
                    need = step_bytes(sched.model, live, position)
                    ceiling = sum(need.values()) / copy_rate * 1e3
                    row = {"variant": label, "live": live, "position": position, "ms": ms, "tok_s": live / ms * 1e3,
                           "ceiling_ms": ceiling, "bytes": need, "of_ceiling": ceiling / ms}
                    results["steps"].append(row)
                    print(f"{args.config} {args.quant} {label:22s} {live:2d}/{args.max_batch} live at {position:5d}: "
                          f"{ms:6.3f} ms/step {row['tok_s']:8.0f} tok/s | ceiling {ceiling:.3f} ms "
                          f"({sum(need.values()) / 1e9:.2f} GB): {100 * row['of_ceiling']:.0f} %", flush=True)
            if args.profile:
                results.setdefault("profile", {})[label] = kernels(sched, args.position[-1], label)
        except Exception as exc:  # one variant's failure: the others still run
            traceback.print_exc()
            results["errors"].append(f"{label}: {exc!r}")
        sched._graph = None


def sweep(args, seconds: float, results: dict) -> bool:
    """The kernels' sweep, its table applied in this process (and written with --write-table)."""
    try:
        linear, rows, log = sweep_rows_kernels.sweep(seconds, first=args.max_batch)
    except Exception as exc:
        traceback.print_exc()
        results["errors"].append(f"sweep: {exc!r}")
        return False
    source = f"swept on {results['device']} at {results['date']} by {results['command']}"
    if args.write_table:
        sweep_rows_kernels.write_table(linear, rows, source)
    else:
        sweep_rows_kernels.apply_table(linear, rows)
    results["sweep"] = log
    results["table_after"] = sweep_rows_kernels.table_source(linear, rows, source)
    print("# the swept table (kernels/rows_tuning.py):\n" + results["table_after"], flush=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="Qwen3.5-2B")
    parser.add_argument("--quant", default="int8hu")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--live", default="1,8,32")
    parser.add_argument("--position", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default="dense,int8,int8+pdl", help="of dense, int8, each with +pdl")
    parser.add_argument("--reference", action="store_true", help="also the reference ops alone (BatchOps)")
    parser.add_argument("--profile", action="store_true", help="kernel times of each variant's step, all rows live")
    parser.add_argument("--sweep", action="store_true", help="tune the kernels' block sizes (sweep_rows_kernels)")
    parser.add_argument("--sweep-seconds", type=float, default=180, help="past this, the sweep times the table only")
    parser.add_argument("--write-table", action="store_true", help="rewrite kernels/rows_tuning.py from the sweep")
    parser.add_argument("--max-seconds", type=float, default=420,
                        help="the whole run: the sweep shrinks, and later phases are skipped, to end by then")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    left = lambda: args.max_seconds - (time.perf_counter() - clock)  # noqa: E731
    args.live_counts = [min(int(n), args.max_batch) for n in args.live.split(",")]
    variants = args.variants.split(",") + (["reference"] if args.reference else [])
    copy_rate = measured_bandwidth(torch.device("cuda"))
    results = {"date": started.isoformat(timespec="seconds"), "config": args.config, "quant": args.quant,
               "command": " ".join(["python3", "benchmarks/bench_batch_step.py", *sys.argv[1:]]),
               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "max_batch": args.max_batch, "context": args.context, "copy_tb_s": copy_rate / 1e12,
               "table_before": rows_tuning.SOURCE, "steps": [], "errors": [], "skipped": []}
    print(f"# {results['command']}\n# {results['device']}, torch {torch.__version__}, Triton {triton.__version__}, "
          f"{results['date']}; device copy {copy_rate / 1e12:.2f} TB/s (read + write)", flush=True)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ckpt = make_checkpoint(Path(tmp) / "ckpt", args.config, torch.device("cuda"))
        bundle = convert(str(ckpt), Path(tmp) / "b", quant=args.quant, backend="torch", max_context=args.context,
                         log=None)
        engine = Engine(bundle, backend="torch", device="cuda", max_batch=args.max_batch, cache_bytes=0)
        sched, kept = engine.scheduler, engine.backend.prompt_copies
        print(f"# engine ready after {time.perf_counter() - clock:.0f} s", flush=True)
        try:
            time_variants(sched, kept, variants, " (table)" if args.sweep else "", args, copy_rate, results)
            if args.sweep and left() < 150:
                results["skipped"].append("sweep (time)")
            elif args.sweep:  # leave ~2 minutes for the swept variants, exactness and the summary
                if sweep(args, min(args.sweep_seconds, left() - 120), results) and left() > 60:
                    time_variants(sched, kept, [v for v in variants if v.startswith("int8")], " (swept)", args,
                                  copy_rate, results)
                elif "sweep" in results:
                    results["skipped"].append("swept variants (time)")
            if left() > 15:
                results["exactness"] = exactness(sched, kept, variants, args.position[-1])
            else:
                results["skipped"].append("exactness (time)")
            summary(results, args.live_counts, args.position,
                    max([r for r in sweep_rows_kernels.ROWS if r <= args.max_batch], default=1))
        finally:
            results["seconds"] = time.perf_counter() - clock
            write_results(results, started, args.results_dir, args.write_table and "table_after" in results)
            engine.close()


def exactness(sched, kept, variants: list[str], position: int) -> dict:
    """Per variant: row 0 alone (the others padding) bit-identical to row 0 among all rows live; greedy
    tokens of all rows equal to the dense variant's, and the largest logit difference from it."""
    snapshot = [t.clone() for t in sched.pool.tensors().values()]
    report, base = {}, None
    for variant in variants:
        try:
            sched.ops, sched._graph = make_ops(sched, variant, kept), None
            together = logits_of(sched, sched.max_batch, position, snapshot)
            alone = logits_of(sched, 1, position, snapshot)
            base = together if base is None else base
            report[variant] = {"row_alone_bit_identical": bool(torch.equal(alone[0], together[0])),
                               "argmax_equal_to_first": float((together.argmax(-1) == base.argmax(-1)).float().mean()),
                               "max_abs_logit_diff_to_first": float((together - base).abs().max())}
        except Exception as exc:
            traceback.print_exc()
            report[variant] = {"error": repr(exc)}
        sched._graph = None
    for t, s in zip(sched.pool.tensors().values(), snapshot):
        t.copy_(s)
    print(f"# exactness at position {position} (against {variants[0]}): {json.dumps(report)}", flush=True)
    return report


def summary(results: dict, live_counts: list[int], positions: list[int], rows: int) -> None:
    """The sweep's figures at `rows` rows (its full table is in the JSON), then the variants side by side:
    ms/step (tok/s) per live count and position, and the ceiling."""
    sweep = [row for row in results.get("sweep", []) if row["rows"] == rows]
    if sweep:
        print(f"\n# the sweep at R={rows}: best, the table's before, (int8 linears) cuBLAS on the bf16 copy",
              flush=True)
    for row in sweep:
        cublas = f"; cuBLAS {row['cublas_bf16_us']:.1f} us" if "cublas_bf16_us" in row else ""
        print(f"  {row['kernel']:18s} {row['shape']:40s} {row['best_us']:8.1f} us ({row['best_tb_s']:.2f} TB/s) "
              f"{row['best']}, before {row['table_us']:.1f} us{cublas}", flush=True)
    labels = list(dict.fromkeys(row["variant"] for row in results["steps"]))
    print("\n# side by side: ms/step (tok/s); ceiling = bytes a step must move at the copy rate", flush=True)
    print(f"{'live @ position':16s}" + "".join(f"{label:>26s}" for label in labels) + f"{'ceiling':>10s}")
    for live in live_counts:
        for position in positions:
            cells, ceiling = [], None
            for label in labels:
                row = next((r for r in results["steps"] if r["variant"] == label and r["live"] == live
                            and r["position"] == position), None)
                cells.append(f"{row['ms']:.3f} ({row['tok_s']:.0f}) {100 * row['of_ceiling']:3.0f}%" if row else "-")
                ceiling = row["ceiling_ms"] if row else ceiling
            print(f"{f'{live} @ {position}':16s}" + "".join(f"{c:>26s}" for c in cells)
                  + (f"{ceiling:9.3f}" if ceiling else ""), flush=True)


def write_results(results: dict, started: dt.datetime, results_dir: str, table_written: bool) -> None:
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{started.strftime('%Y%m%dT%H%M%SZ')}-batch-step.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"# wrote {path}", flush=True)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
        if table_written:
            shutil.copy(rows_tuning.__file__, Path(os.environ["OUT"]) / "rows_tuning.py")


if __name__ == "__main__":
    main()
