"""Where a decode step's time goes on the GPU: CUDA kernel time by kernel, for one bundle.

Runs the step outside the CUDA graph under the profiler (the graph hides its kernels) and prints kernel
time grouped by name, the sum, and the graph-replayed time per step (with and without PDL) for comparison;
prompt chunks the same way (`--prefill`), and run/chat/serve's time to first token with its host calls (`--ttft`).
  python benchmarks/profile_step.py --config Qwen3.5-2B --quant int8hu --prefill 128 2048 --ttft 128
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode import chunked_prefill, make_checkpoint  # noqa: E402
from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.bench import prompt_ids  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.engine.request import Request  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="Qwen3.5-2B")
    parser.add_argument("--quant", default="int8hu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill", type=int, nargs="*", default=[], help="also profile prompt chunks of these lengths")
    parser.add_argument("--wy-chunks", default="", help="time that prefill with these GDN (WY) chunk lengths, e.g. 64,128")
    parser.add_argument("--ttft", type=int, nargs="*", default=[],
                        help="profile run/chat/serve's time to first token for cold prompts of these lengths")
    parser.add_argument("--wy-variants", action="store_true",
                        help="also time the prompt chunks with the GDN's WY chunks walked and prepared by torch ops or "
                             "the Triton kernels, side by side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", args.config, torch.device("cuda"))
        engine = Engine(convert(str(ckpt), Path(tmp) / "b", quant=args.quant, backend="torch", log=None),
                        backend="torch", device="cuda")
        backend = engine.backend
        token = torch.ones(1, 1, dtype=torch.long, device="cuda")
        ops = backend.model.ops
        replay = {}

        def time_replay(label: str) -> None:
            backend._graphs.clear()
            engine.complete(Request(list(range(1, 65)), max_tokens=4, ignore_eos=True))  # compile + capture
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for pos in range(64, 64 + args.steps):
                    backend.step(token, pos)
                torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - start) / args.steps)
            replay[label] = best

        pdl0 = getattr(ops, "pdl", False)
        for label, pdl in [("PDL on", True), ("PDL off", False)] if pdl0 else [("default", False)]:
            ops.pdl = pdl
            time_replay(label)
        ops.pdl = pdl0
        window = backend.state.capacity
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for pos in range(64, 64 + args.steps):
                backend.model.step(token, torch.tensor([pos], device="cuda"), backend.state, window)
            torch.cuda.synchronize()
        print("graph replay (best of 3): " + ", ".join(f"{label} {1e3 * t:.3f} ms/step ({1 / t:.0f} steps/s)"
                                                       for label, t in replay.items()))
        print_kernels(prof, args.steps, "kernel time (eager, no graph), per step", top=20)
        for tokens in args.prefill:
            profile_prefill(engine, tokens)
        if args.wy_variants and args.prefill:
            compare_wy_variants(engine, args.prefill)
        if args.prefill:
            for chunk in filter(None, args.wy_chunks.split(",")):
                print(f"  GDN chunk {chunk}: {time_prefill(engine, args.prefill[-1], int(chunk)):.0f} tok/s")
        for tokens in args.ttft:
            profile_ttft(engine, tokens)


def time_prefill(engine, tokens: int, wy_chunk: int) -> float:
    """bench_decode's chunked prefill (best of 3, one chunk) with the GDN's WY chunk length set to wy_chunk."""
    from lmbundle.models import layers

    ops, defaults = engine.backend.model.ops, layers.gated_delta_chunk.__defaults__
    layers.gated_delta_chunk.__defaults__ = (wy_chunk, *defaults[1:])
    wy_kernel_chunk = getattr(ops, "wy_chunk", None)
    if wy_kernel_chunk:  # the Triton walk's chunk length
        ops.wy_chunk = wy_chunk
    try:
        engine.backend._prefill_graphs = None  # captured with the old chunk length
        return chunked_prefill(engine, tokens, tokens)
    finally:
        layers.gated_delta_chunk.__defaults__ = defaults
        if wy_kernel_chunk:
            ops.wy_chunk = wy_kernel_chunk


def compare_wy_variants(engine, lengths: list[int]) -> None:
    """One prompt chunk of each length replayed (best of 3) with the GDN's WY chunks walked and prepared by
    torch ops or the Triton kernels (`triton_chunks`): the figures behind `triton_ops.WY_PREPARE_MAX`."""
    backend = engine.backend
    ops = backend.model.ops
    saved = ops.wy_chunk, ops.wy_prepare_max
    variants = {"torch walk + torch preparation": (None, 0), "kernel walk + torch preparation": (32, 0),
                "kernel walk + kernel preparation": (32, 1 << 30)}
    print("prompt chunk replayed, ms (tok/s): " + ", ".join(f"{n} tokens" for n in lengths))
    for label, (chunk, prepare_max) in variants.items():
        ops.wy_chunk, ops.wy_prepare_max = chunk, prepare_max
        backend._prefill_graphs = None  # captured with the other variant
        rates = [chunked_prefill(engine, n, n) for n in lengths]
        print(f"  {label:34s}" + "".join(f" {n / r * 1e3:8.2f} ({r:6.0f})" for n, r in zip(lengths, rates)))
    ops.wy_chunk, ops.wy_prepare_max = saved
    backend._prefill_graphs = None


def profile_prefill(engine, tokens: int) -> None:
    """Kernel time of one prompt chunk by kernel name, run eagerly (a graph replay hides its kernels), and
    the same chunk replayed as the engine runs it (`graphs.PrefillGraphs`)."""
    backend = engine.backend
    ids = [(7 + 13 * i) % 1000 for i in range(tokens)]
    model, device_ids = backend.model, torch.tensor(ids, device="cuda")
    backend.reset(tokens + 1)
    with torch.inference_mode():
        model.forward_tokens(device_ids, 0, backend.state, last_only=True)  # warm-up
        backend.reset(tokens + 1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.forward_tokens(device_ids, 0, backend.state, last_only=True)
            torch.cuda.synchronize()
    rate = chunked_prefill(engine, tokens, tokens)  # the engine's replay, best of 3 (the first captures)
    print(f"prompt chunk of {tokens} replayed as a CUDA graph: {tokens / rate * 1e3:.2f} ms ({rate:.0f} tok/s)")
    print_kernels(prof, 1, f"prompt chunk of {tokens}, eager", top=25)


def profile_ttft(engine, tokens: int) -> None:
    """A cold prompt's time to first token as run/chat/serve take it (`Engine.generate`, chunks of 256, the
    prefix cache's snapshots), against the kernels it ran and the host calls that took the time: where the
    TTFT goes beyond the prompt's replay."""
    ids = prompt_ids(engine, tokens, 11, 17)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    times = []
    for trial in range(4):  # the first captures the prompt's graph
        engine.forget()
        with torch.profiler.profile(activities=activities) if trial == 3 else contextlib.nullcontext() as prof:
            stats = engine.complete(Request(ids, max_tokens=1, ignore_eos=True, prefill_chunk=256)).stats
        times.append(stats.prefill_seconds)
    print(f"TTFT of a cold {tokens}-token prompt: " + ", ".join(f"{1e3 * t:.2f}" for t in times) + " ms "
          "(the first captures; the last under the profiler)")
    if engine.device.type == "cuda":
        print_kernels(prof, 1, f"TTFT of {tokens} tokens, its kernels", top=8)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    print("  host calls by self time:")
    for e in events[:15]:
        print(f"  {e.self_cpu_time_total / 1e3:7.3f} ms  {e.count:5d}x  {e.key[:100]}")


def print_kernels(prof, runs: int, label: str, top: int) -> None:
    """The profiled CUDA kernels by self time per run (of `runs`), the largest `top` of them."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / runs
    print(f"{label}: kernel time {total / 1e3:.3f} ms in {sum(e.count for e in events) / runs:.0f} kernels")
    for e in events[:top]:
        print(f"  {e.self_device_time_total / runs / 1e3:7.3f} ms  {e.count // runs:5d}x  {e.key[:100]}")


if __name__ == "__main__":
    main()
