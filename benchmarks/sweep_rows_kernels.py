"""Block sizes of the batched step's kernels at Qwen3.5-2B shapes and R = 1, 8, 16, 32, 64 rows (CUDA).

Every candidate launch configuration of the int8 rows linear (`triton_rows_linear`, with the fused
epilogue its shape gets in the step) and of the rows kernels between the GEMMs (`triton_rows`) is timed in
CUDA graph replay, cycling over enough copies of its weights / states / KV that each call reads device
memory, not L2 (as in the step, where 2 GB of weights pass between two uses of a layer). Prints the best
per kernel and shape, cuBLAS on the 16-bit copy beside each linear, and returns the table of
`lmbundle/engine/kernels/rows_tuning.py` the winners make (a rows kernel gets the one configuration with
the least total time relative to each case's best). Run through `bench_batch_step.py --sweep`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from benchmarks.timing import replayed_seconds
from lmbundle.engine.kernels import rows_tuning, triton_rows
from lmbundle.engine.kernels.triton_gemv import GatedNormInput
from lmbundle.engine.kernels.triton_rows_linear import LinearTiles, row_tile, rows_linear
from lmbundle.models.linear import dequantize
from lmbundle.models.ops import Norm

DEVICE = "cuda"
ROWS = (1, 8, 16, 32, 64)
HIDDEN, INTER, VOCAB, HK, HV, DK, DV, CONV_TAPS = 2048, 6144, 248320, 16, 16, 128, 128, 4
CONV, IN_PROJ = 2 * HK * DK + HV * DV, 2 * HK * DK + 2 * HV * DV + 2 * HV
HEADS, KV_HEADS, HEAD_DIM, ROT, CAPACITY = 8, 2, 256, 64, 4096
LINEARS = {  # label: (outputs, inputs, fused epilogue)
    "gdn in_proj": (IN_PROJ, HIDDEN, ""),
    "attn qkv": (HEADS * HEAD_DIM * 2 + 2 * KV_HEADS * HEAD_DIM, HIDDEN, ""),
    "gdn out_proj / attn o_proj + residual": (HIDDEN, HIDDEN, "residual"),
    "mlp gate/up + swiglu": (INTER, HIDDEN, "swiglu"),
    "mlp down + residual": (HIDDEN, INTER, "residual"),
    "lm_head": (VOCAB, HIDDEN, ""),
}
# (block_n, groups, warps, stages): mma.sync tiles (1-2 warps) and wgmma tiles (4-8 warps)
TILES = [(64, 2, 2, 4), (64, 4, 2, 3), (32, 2, 1, 4), (32, 4, 2, 4), (128, 2, 2, 3),
         (64, 2, 4, 4), (128, 2, 4, 4), (128, 4, 4, 3), (256, 2, 8, 3)]
SPLITS = (1, 2, 3, 4, 6, 8)
MAX_PROGRAMS = 8 * 132  # splits past this many programs only add partial sums
ROW_KERNELS = {  # kernel: candidate launch parameters
    "rms_norm_rows": [{"num_warps": w} for w in (1, 2, 4, 8, 16)],
    "conv_silu_rows": [{"block": b, "num_warps": w} for b in (256, 512, 1024, 2048) for w in (2, 4, 8)],
    "gated_delta_rows": [{"block_v": b, "num_warps": w} for b in (8, 16, 32, 64) for w in (1, 2, 4)],
    "gated_norm_rows": [{"num_warps": w} for w in (1, 2, 4)],
    "attention_rows": [{"split_len": s, "block_l": b, "num_warps": w, "num_stages": st}
                       for s in (64, 128, 256, 512, 1024) for b in (16, 32, 64) for w in (4, 8) for st in (2, 3)
                       if b <= s and not (b == 64 and st == 3)],
}
ATTENTION_POSITIONS = (256, 2048)
FLUSH_BYTES = 256 << 20  # copies cycled per graph: a few times the H100's / H200's 50 MB L2
REPLAY_BYTES = 4e8  # bytes one timed replay reads: long enough that the events' overhead is noise
REPLAYS = 5
# a candidate this far from cuBLAS (relative norm of the difference) computes something else: bf16 roundings of
# the outputs (and SwiGLU's three) differ by ~1e-3, a wrong tile or split by O(1)
WRONG = 5e-2


def copies(nbytes: int, make: Callable[[], object], most: int = 64) -> list:
    return [make() for _ in range(max(1, min(most, math.ceil(FLUSH_BYTES / max(nbytes, 1)))))]


def seconds_per_call(calls: list[Callable[[], object]], nbytes: int) -> float:
    """Median seconds of one call (benchmarks/timing.py), replays reading about REPLAY_BYTES."""
    return replayed_seconds(calls, nbytes, REPLAY_BYTES, 256, REPLAYS)


class Budget:
    """Wall-clock seconds for the sweep: past them each case times its current table entry only."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    @property
    def spent(self) -> bool:
        return time.perf_counter() > self.end


def _try(calls, nbytes) -> float | None:
    try:
        return seconds_per_call(calls, nbytes)
    except (triton.runtime.errors.OutOfResources, triton.CompilationError, RuntimeError) as exc:
        print(f"    skipped: {str(exc).splitlines()[0][:100]}", flush=True)
        torch.cuda.synchronize()
        return None


def int8_weights(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, device=DEVICE),
            (torch.rand(out_features, in_features // 32, device=DEVICE) * 0.02 + 1e-3).half())


def sweep_linear(label: str, rows: int, budget: Budget, log: list) -> dict[LinearTiles, float]:
    """One linear at `rows` rows: cuBLAS on its bf16 copy (the batched step's alternative, rows padded to
    16 and the epilogue as torch ops), then every tile and K split of the int8 rows linear; returns
    {(candidate tiles): seconds}."""
    out_features, in_features, fused = LINEARS[label]
    parts = 2 if fused == "swiglu" else 1
    int8_bytes = parts * out_features * in_features * 34 // 32
    weights = copies(int8_bytes, lambda: [int8_weights(out_features, in_features) for _ in range(parts)])
    x = torch.randn(rows, in_features, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn(rows, out_features, device=DEVICE, dtype=torch.bfloat16)
    padded = F.pad(x, (0, 0, 0, -(-rows // 16) * 16 - rows))
    dense = [[dequantize(q, s, torch.bfloat16) for q, s in w] for w in weights[:max(1, len(weights) // 2)]]
    epilogue = {"": lambda y, w: y, "residual": lambda y, w: residual + y,
                "swiglu": lambda y, w: F.silu(y) * F.linear(padded, w[1])[:rows]}[fused]
    cublas = seconds_per_call([lambda w=w: epilogue(F.linear(padded, w[0])[:rows], w) for w in dense],
                              2 * parts * out_features * in_features)
    exact = epilogue(F.linear(padded, dense[0][0])[:rows], dense[0]).float()
    del dense
    counters = torch.zeros(8192, dtype=torch.int32, device=DEVICE)
    current = rows_tuning.linear_tiles(out_features, in_features, rows, fused == "swiglu")
    kwargs = {"residual": residual} if fused == "residual" else {}
    results = {}
    candidates = [current] + [LinearTiles(n, g, split, w, st) for n, g, w, st in TILES for split in SPLITS
                              if rows_tuning.fits(n, g, w, row_tile(rows) * parts)
                              and (split == 1 or (in_features // split >= 256
                                                  and triton.cdiv(out_features, n) * split <= MAX_PROGRAMS))]
    for tiles in dict.fromkeys(candidates):
        if results and budget.spent:
            break

        def call(w, tiles=tiles):
            return rows_linear(x, w[0], tiles, counters, up=w[1] if parts == 2 else None, **kwargs)

        try:
            error = ((call(weights[0]).float() - exact).norm() / exact.norm()).item()
        except (triton.runtime.errors.OutOfResources, triton.CompilationError) as exc:
            print(f"    {tiles}: skipped ({str(exc).splitlines()[0][:80]})", flush=True)
            continue
        if error > WRONG:
            print(f"    {tiles}: WRONG, relative error {error:.2e} against cuBLAS", flush=True)
            continue
        seconds = _try([lambda w=w: call(w) for w in weights], int8_bytes)
        if seconds is not None:
            results[tiles] = seconds
    if not results:
        print(f"  {label:40s} R={rows:2d}: no configuration ran", flush=True)
        return results
    best = min(results, key=results.get)
    row = {"kernel": "int8 rows linear", "shape": label, "rows": rows, "best": list(best),
           "best_us": results[best] * 1e6, "best_tb_s": int8_bytes / results[best] / 1e12,
           "table_us": results.get(current, float("nan")) * 1e6, "table": list(current),
           "cublas_bf16_us": cublas * 1e6, "cublas_tb_s": 2 * parts * out_features * in_features / cublas / 1e12,
           "candidates": len(results)}
    log.append(row)
    print(f"  {label:40s} R={rows:2d}: int8 best {row['best_us']:8.1f} us ({row['best_tb_s']:.2f} TB/s) "
          f"{tuple(best)}, table's {row['table_us']:8.1f} us; cuBLAS bf16 {row['cublas_bf16_us']:8.1f} us "
          f"({row['cublas_tb_s']:.2f} TB/s): x{cublas / results[best]:.2f}", flush=True)
    return results


class Case(NamedTuple):
    """One shape a rows kernel is timed at: calls(config) gives one call per copy of its inputs."""

    label: str
    rows: int
    nbytes: int  # what a call reads and writes
    calls: Callable[[dict], list[Callable[[], object]]]


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16)


def norm_cases(rows: int) -> list[Case]:
    norm = Norm(torch.rand(HIDDEN, device=DEVICE) * 0.1, 1e-6, True)
    xs = copies(rows * HIDDEN * 2, lambda: _bf16(rows, HIDDEN))
    return [Case(f"R={rows}", rows, 2 * rows * HIDDEN * 2,
                 lambda cfg: [lambda x=x: triton_rows.rms_norm_rows(x, norm, **cfg) for x in xs])]


def conv_cases(rows: int) -> list[Case]:
    nbytes = rows * CONV * 2 * (2 + 2 * (CONV_TAPS - 1))
    inputs = copies(nbytes, lambda: (_bf16(rows, IN_PROJ), _bf16(rows, CONV, CONV_TAPS - 1)))
    live, weight = torch.ones(rows, dtype=torch.int32, device=DEVICE), _bf16(CONV, CONV_TAPS)
    return [Case(f"R={rows}", rows, nbytes, lambda cfg: [
        lambda p=p, c=c: triton_rows.conv_silu_rows(p, live, c, weight, **cfg) for p, c in inputs])]


def delta_cases(rows: int) -> list[Case]:
    nbytes = rows * HV * DK * DV * 4 * 2
    inputs = copies(nbytes, lambda: (_bf16(rows, IN_PROJ), torch.randn(rows, HV, DK, DV, device=DEVICE) * 0.01))
    live = torch.ones(rows, dtype=torch.int32, device=DEVICE)
    a_log, dt_bias = torch.randn(HV, device=DEVICE), torch.randn(HV, device=DEVICE)
    return [Case(f"R={rows}", rows, nbytes, lambda cfg: [
        lambda p=p, r=r: triton_rows.gated_delta_rows(p, live, a_log, dt_bias, r, (HK, HV), (DK, DV), **cfg)
        for p, r in inputs])]


def gated_norm_cases(rows: int) -> list[Case]:
    nbytes = rows * HV * DV * 2 * 3
    inputs = copies(nbytes, lambda: GatedNormInput(_bf16(rows, HV * DV), torch.rand(rows, HV, 8, device=DEVICE),
                                                   _bf16(rows, HV * DV), torch.rand(DV, device=DEVICE), 1e-6, DV))
    return [Case(f"R={rows}", rows, nbytes, lambda cfg: [lambda h=h: triton_rows.gated_norm_rows(h, **cfg)
                                                         for h in inputs])]


def attention_cases(rows: int) -> list[Case]:
    """Every row at each of ATTENTION_POSITIONS of a CAPACITY-slot cache: reads its KV prefix."""
    cache_bytes = 2 * rows * KV_HEADS * CAPACITY * HEAD_DIM * 2
    caches = copies(cache_bytes, lambda: [_bf16(rows, KV_HEADS, CAPACITY, HEAD_DIM) * 0.3 for _ in range(2)], most=16)
    projected = _bf16(rows, HEADS * HEAD_DIM * 2 + 2 * KV_HEADS * HEAD_DIM)
    q_norm, k_norm = torch.rand(HEAD_DIM, device=DEVICE) * 0.1, torch.rand(HEAD_DIM, device=DEVICE) * 0.1
    cos, sin = torch.rand(rows, ROT, device=DEVICE), torch.rand(rows, ROT, device=DEVICE)
    live = torch.ones(rows, dtype=torch.int32, device=DEVICE)
    cases = []
    for position in ATTENTION_POSITIONS:
        positions = torch.full((rows,), position, dtype=torch.long, device=DEVICE)

        def calls(cfg, positions=positions):
            return [lambda k=k, v=v: triton_rows.attention_rows(projected, positions, live, q_norm, k_norm, cos, sin,
                                                                k, v, (HEADS, KV_HEADS), HEAD_DIM, True, True, 1e-6,
                                                                **cfg)
                    for k, v in caches]

        cases.append(Case(f"R={rows} at {position}", rows, 2 * rows * KV_HEADS * (position + 1) * HEAD_DIM * 2,
                          calls))
    return cases


CASES = {"rms_norm_rows": norm_cases, "conv_silu_rows": conv_cases, "gated_delta_rows": delta_cases,
         "gated_norm_rows": gated_norm_cases, "attention_rows": attention_cases}


def sweep_rows_case(kernel: str, case: Case, log: list) -> dict[int, float]:
    """Every candidate of a rows kernel on one case: {candidate index (0: the table's): seconds}."""
    candidates = rows_candidates(kernel)
    times = {}
    for i, config in enumerate(candidates):
        seconds = _try(case.calls(config), case.nbytes)
        if seconds is not None:
            times[i] = seconds
    if times:
        best = min(times, key=times.get)
        log.append({"kernel": kernel, "shape": case.label, "rows": case.rows, "best": candidates[best],
                    "best_us": times[best] * 1e6, "best_tb_s": case.nbytes / times[best] / 1e12,
                    "table": candidates[0], "table_us": times.get(0, math.nan) * 1e6})
        print(f"  {kernel:18s} {case.label:14s}: best {times[best] * 1e6:7.1f} us "
              f"({case.nbytes / times[best] / 1e12:.2f} TB/s) {candidates[best]}; "
              f"table's {times.get(0, math.nan) * 1e6:7.1f} us", flush=True)
    return times


def rows_candidates(kernel: str) -> list[dict]:
    current = rows_tuning.rows_config(kernel)
    return [current] + [c for c in ROW_KERNELS[kernel] if c != current]


def least_relative(cases: list[dict]) -> object:
    """Of the keys timed in any case, the one with the least sum of time / that case's best (a key missing
    from a case, not timed or failed there, counts as 10x its best)."""
    cases = [case for case in cases if case]
    keys = set().union(*cases)
    return min(keys, key=lambda k: sum(case[k] / min(case.values()) if k in case else 10.0 for case in cases))


def sweep(budget_seconds: float, first: int = 32) -> tuple[dict, dict, list]:
    """All kernels at each row count of ROWS in turn, `first` (the scheduler's) first, then the larger ones:
    (LINEAR table, ROWS table, one log row per kernel, shape and rows count). Past the budget the remaining
    cases are skipped, and their table entries stay as they were."""
    budget, log = Budget(budget_seconds), []
    linear_times: dict[tuple, list[dict]] = {}  # (shape label, row tile): per rows count {tiles: seconds}
    rows_times: dict[str, list[dict]] = {kernel: [] for kernel in ROW_KERNELS}
    for rows in sorted(ROWS, key=lambda r: (r != first, -r)):
        if budget.spent:
            print(f"# sweep budget spent: R={rows} and after not swept", flush=True)
            break
        print(f"# R={rows}: int8 rows linear tiles (block_n, groups, split_k, warps, stages) against cuBLAS on the "
              "bf16 copy, then the rows kernels' launch parameters", flush=True)
        for label in LINEARS:
            if not budget.spent:
                linear_times.setdefault((label, row_tile(rows)), []).append(sweep_linear(label, rows, budget, log))
        for kernel in ROW_KERNELS:
            for case in CASES[kernel](rows) if not budget.spent else []:
                rows_times[kernel].append(sweep_rows_case(kernel, case, log))
    linear = dict(rows_tuning.LINEAR)
    for (label, tile), cases in linear_times.items():  # one entry a row tile: R = 1, 8, 16 share the 16
        if any(cases):
            out_features, in_features, fused = LINEARS[label]
            linear[(out_features, in_features, fused == "swiglu", tile)] = tuple(least_relative(cases))
    rows = {kernel: rows_candidates(kernel)[least_relative(cases)] if any(cases) else rows_tuning.rows_config(kernel)
            for kernel, cases in rows_times.items()}
    return linear, rows, log


def table_source(linear: dict, rows: dict, source: str) -> str:
    """The block of rows_tuning.py between its markers, for these tables."""
    lines = [f"SOURCE = {source!r}",
             "LINEAR = {  # (out features, in features, swiglu, row tile): (block_n, groups, split_k, warps, stages)"]
    lines += [f"    {key!r}: {tuple(value)!r}," for key, value in sorted(linear.items())]
    lines += ["}", "ROWS = {  # kernel: its launch parameters"]
    lines += [f"    {kernel!r}: {config!r}," for kernel, config in rows.items()]
    return "\n".join(lines + ["}"]) + "\n"


def write_table(linear: dict, rows: dict, source: str) -> None:
    """Rewrite the table of rows_tuning.py (between its markers) and apply it in this process."""
    path = rows_tuning.__file__
    text = open(path).read()
    start = text.index("\n", text.index("# --- table:")) + 1
    end = text.index("# --- end of table ---")
    with open(path, "w") as f:
        f.write(text[:start] + table_source(linear, rows, source) + text[end:])
    apply_table(linear, rows)


def apply_table(linear: dict, rows: dict) -> None:
    rows_tuning.LINEAR.clear()
    rows_tuning.LINEAR.update(linear)
    rows_tuning.ROWS.update(rows)
