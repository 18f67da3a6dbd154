"""Does a persistent, weight-streaming kernel beat PDL-chained launches for the decode step's GEMV chain?

The probe: L layers of the 2B's MLP shape as two dependent int8 GEMVs, h = W_up[l] @ x (6144 x 2048) and
x = x + W_down[l] @ h (2048 x 6144), the same bytes (L x 25 MB, far beyond L2) run two ways:
  - chained: 2L launches of the engine's GEMV kernel (`triton_gemv.gemv`, PDL as the engine uses it), in
    one CUDA graph;
  - persistent: ONE launch of a grid of resident programs (one or two per SM) that walks the layers: each
    program takes row blocks of the current stage, then issues the loads of its first tile of the next
    stage (weights never depend on activations) and only then waits at a grid-wide barrier (an atomic
    arrival counter it spins on) for the stage's output.
Prints microseconds per layer and the weight bytes / time in TB/s for each, beside a device copy.
    python3 benchmarks/persistent_probe.py [--layers 24] [--json out.json]
The barrier spin gives up after a bounded number of polls (and the probe reports it) rather than hang
if the programs were not all resident.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmbundle.engine.kernels import triton_gemv  # noqa: E402

HIDDEN, INTER = 2048, 6144


@triton.jit
def _grid_barrier(bar_ptr, target, flag_ptr):
    """All programs have arrived `target` times in total (a monotonic counter, zeroed before the launch).
    Gives up (sets flag) after ~1M polls, and every later barrier then passes at once: no hang."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    polls = 0
    healthy = tl.load(flag_ptr, volatile=True) == 0
    while (tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu") < target) & (polls < 1_000_000) & healthy:
        polls += 1
    if polls >= 1_000_000:
        tl.atomic_xchg(flag_ptr, 1)
    tl.debug_barrier()


@triton.jit
def _stage(x_ptr, w_ptr, s_ptr, y_ptr, res_ptr, rows_total, groups_total, pid, programs, w_first, s_first,
           BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, RESIDUAL: tl.constexpr):
    """Row blocks pid, pid + programs, ... of y = W @ x (+ res); the first block's first tile is given."""
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, 32)
    in_features = groups_total * 32
    first = True
    for block in range(pid, tl.cdiv(rows_total, BLOCK_N), programs):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        w_off = rows[:, None, None].to(tl.int64) * in_features + groups[None, :, None] * 32 + cols[None, None, :]
        s_off = rows[:, None].to(tl.int64) * groups_total + groups[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        if first:
            w, s = w_first, s_first
        else:
            w = tl.load(w_ptr + w_off)
            s = tl.load(s_ptr + s_off).to(tl.float32)
        first = False
        for g0 in range(0, groups_total, BLOCK_G):
            nxt = (g0 + BLOCK_G + groups) < groups_total
            w_next = tl.load(w_ptr + w_off + (g0 + BLOCK_G) * 32, mask=nxt[None, :, None], other=0)
            s_next = tl.load(s_ptr + s_off + g0 + BLOCK_G, mask=nxt[None, :], other=0.0).to(tl.float32)
            h = tl.load(x_ptr + g0 * 32 + groups[:, None] * 32 + cols[None, :], cache_modifier=".cg").to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * h[None, :, :], axis=2) * s
            w, s = w_next, s_next
        y = tl.sum(acc, axis=1)
        if RESIDUAL:
            res = tl.load(res_ptr + rows, cache_modifier=".cg")
            y = res.to(tl.float32) + y.to(res.dtype).to(tl.float32)
        tl.store(y_ptr + rows, y)


@triton.jit
def _first_tile(w_ptr, s_ptr, pid, groups_total, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, 32)
    w_off = rows[:, None, None].to(tl.int64) * (groups_total * 32) + groups[None, :, None] * 32 + cols[None, None, :]
    s_off = rows[:, None].to(tl.int64) * groups_total + groups[None, :]
    return tl.load(w_ptr + w_off), tl.load(s_ptr + s_off).to(tl.float32)


@triton.jit
def _persistent_chain(x_ptr, h_ptr, up_w, up_s, down_w, down_s, bar_ptr, flag_ptr, layers,
                      BLOCK_N_UP: tl.constexpr, BLOCK_N_DOWN: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    up_groups: tl.constexpr = HIDDEN_C // 32
    down_groups: tl.constexpr = INTER_C // 32
    w, s = _first_tile(up_w, up_s, pid, up_groups, BLOCK_N_UP, BLOCK_G)
    arrivals = 0
    for layer in range(layers):
        uw = up_w + layer.to(tl.int64) * INTER_C * HIDDEN_C
        us = up_s + layer.to(tl.int64) * INTER_C * up_groups
        _stage(x_ptr, uw, us, h_ptr, x_ptr, INTER_C, up_groups, pid, programs, w, s, BLOCK_N_UP, BLOCK_G, False)
        dw = down_w + layer.to(tl.int64) * HIDDEN_C * INTER_C
        ds = down_s + layer.to(tl.int64) * HIDDEN_C * down_groups
        w, s = _first_tile(dw, ds, pid, down_groups, BLOCK_N_DOWN, BLOCK_G)  # streams while others finish
        arrivals += programs
        _grid_barrier(bar_ptr, arrivals, flag_ptr)
        _stage(h_ptr, dw, ds, x_ptr, x_ptr, HIDDEN_C, down_groups, pid, programs, w, s, BLOCK_N_DOWN, BLOCK_G, True)
        if layer + 1 < layers:
            w, s = _first_tile(uw + INTER_C * HIDDEN_C, us + INTER_C * up_groups, pid, up_groups, BLOCK_N_UP,
                               BLOCK_G)
        arrivals += programs
        _grid_barrier(bar_ptr, arrivals, flag_ptr)


HIDDEN_C = tl.constexpr(HIDDEN)
INTER_C = tl.constexpr(INTER)


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    L, dev = args.layers, "cuda"
    up_w = torch.randint(-127, 128, (L, INTER, HIDDEN), dtype=torch.int8, device=dev)
    # scales that keep x finite over the layers (x grows ~7x a layer), so the result can be compared
    up_s = (torch.rand(L, INTER, HIDDEN // 32, device=dev) * 1e-3 + 1e-4).half()
    down_w = torch.randint(-127, 128, (L, HIDDEN, INTER), dtype=torch.int8, device=dev)
    down_s = (torch.rand(L, HIDDEN, INTER // 32, device=dev) * 1e-4 + 1e-5).half()
    nbytes = L * 2 * INTER * HIDDEN * 34 // 32
    x0 = torch.randn(HIDDEN, device=dev, dtype=torch.bfloat16)
    report = {"device": torch.cuda.get_device_name(), "layers": L, "weight_bytes": nbytes}

    big = torch.empty(2 * nbytes // 2, dtype=torch.uint8, device=dev)
    copy_s = timed(lambda: big[: nbytes // 2].copy_(big[nbytes // 2:]))
    report["copy_tb_s"] = nbytes / copy_s / 1e12  # bytes read + written

    results = {}
    for pdl in (True, False):
        x = x0.clone()

        def chained():
            for layer in range(L):
                h = triton_gemv.gemv(x, up_w[layer], up_s[layer], pdl=pdl)
                x.copy_(triton_gemv.gemv(h, down_w[layer], down_s[layer], residual=x, pdl=pdl))
        # the copy_ is one more node per layer: time it alone and take it out
        results[f"chained (PDL {'on' if pdl else 'off'})"] = timed(chained)
    xs = x0.clone()
    copies_s = timed(lambda: [xs.copy_(x0) for _ in range(L)])
    for key in list(results):
        results[key] -= copies_s

    # reference result for the persistent kernel
    ref = x0.clone()
    for layer in range(L):
        h = triton_gemv.gemv(ref, up_w[layer], up_s[layer])
        ref = triton_gemv.gemv(h, down_w[layer], down_s[layer], residual=ref)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # one BLOCK_N for both stages: the loop carries the prefetched tile from one stage to the next
    for per_sm, block_up, block_down, block_g, warps in [(2, 4, 4, 32, 4), (1, 8, 8, 32, 8), (2, 8, 8, 16, 4)]:
        programs = sms * per_sm
        x = x0.clone()
        h = torch.empty(INTER, device=dev, dtype=torch.bfloat16)
        bar = torch.zeros(1, dtype=torch.int32, device=dev)
        flag = torch.zeros(1, dtype=torch.int32, device=dev)

        def persistent():
            bar.zero_()
            _persistent_chain[(programs,)](x, h, up_w, up_s, down_w, down_s, bar, flag, L, BLOCK_N_UP=block_up,
                                           BLOCK_N_DOWN=block_down, BLOCK_G=block_g, num_warps=warps)
        key = f"persistent {programs} programs, rows {block_up}/{block_down}, groups {block_g}, warps {warps}"
        try:
            persistent()
            torch.cuda.synchronize()
            err = ((x.double() - ref.double()).norm() / ref.double().norm()).item()
            if flag.item():
                results[key] = float("nan")
                print(f"{key}: barrier gave up (programs not resident)")
                continue
            # time without the check's reset of x: values drift but bytes are the same
            results[key] = timed(persistent) - timed(lambda: bar.zero_())
            print(f"{key}: rel err vs chained {err:.2e}")
        except Exception as exc:  # noqa: BLE001
            print(f"{key}: failed {str(exc)[:300]}")
    print(f"copy: {report['copy_tb_s']:.2f} TB/s (read + write); chain of {L} layers x (6144x2048 + 2048x6144) int8")
    for key, seconds in results.items():
        print(f"  {key:70s} {1e6 * seconds / L:7.1f} us/layer  {nbytes / seconds / 1e12:5.2f} TB/s")
    report["results_s"] = results
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
