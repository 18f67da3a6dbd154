"""Decode and prefill speed of lmbundle vs transformers on the same random-weight checkpoint, one run.

Builds a Qwen3.5 checkpoint at a real config (random bf16 weights: decode speed does not depend on the
values) with transformers' own class, converts it to lmbundle bundles, and measures, with the seed's
llm-benchmark protocol (p prompt tokens, g generated, n trials after a 1-token warm-up):
  - our engine (PyTorch backend; CUDA graphs + fused int8 GEMV on CUDA) per quant mode,
  - chunked prefill of a long prompt,
  - transformers (bf16, eager attention; its default GDN path) greedy generate,
and prints the ratios. Usage (GPU):
  python benchmarks/bench_decode.py --config Qwen3.5-2B --quant int8hu fp16 -p 128 -g 256 -n 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.bench import bench, format_bench, measured_bandwidth  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from tests import checkpoints  # noqa: E402


def make_checkpoint(folder: Path, name: str, device: torch.device) -> Path:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**checkpoints.REAL_CONFIGS[name])).to(torch.bfloat16)
    model.save_pretrained(folder)
    checkpoints.make_tokenizer(folder, 512)
    del model
    return folder


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def chunked_prefill(engine: Engine, tokens: int, chunk: int) -> float:
    ids = [(7 + 13 * i) % 1000 for i in range(tokens)]
    backend = engine.backend
    best = float("inf")
    for _ in range(3):
        backend.reset(tokens + 1)
        sync(engine.device)
        start = time.perf_counter()
        backend.prefill(ids, chunk)
        sync(engine.device)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def profile_decode(engine: Engine, steps: int = 32) -> str:
    """Host-side calls per decoded token in the steady state: one graph launch and one token read."""
    ids = [(17 + 31 * i) % 1000 for i in range(64)]
    list(engine.generate(ids, 8, stop=False))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        list(engine.generate(ids, steps, stop=False))
    rows = {e.key: e.count for e in prof.key_averages()}
    keep = ("cudaGraphLaunch", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
            "aten::item", "aten::_local_scalar_dense")
    return ", ".join(f"{k}: {rows[k]}" for k in keep if k in rows) + f" (for {steps} tokens + {len(ids)} prompt steps)"


def transformers_peer(folder: Path, device: torch.device, p: int, g: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor([[(17 + 31 * i) % 1000 for i in range(p)]], device=device)

    def timed(n):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    timed(2)  # warm-up
    first = timed(1)
    total = timed(g)
    return {"prefill_tok_s": p / first, "decode_tok_s": (g - 1) / (total - first)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="Qwen3.5-2B", choices=sorted(checkpoints.REAL_CONFIGS))
    parser.add_argument("--quant", nargs="+", default=["int8hu", "fp16"])
    parser.add_argument("-p", type=int, default=128)
    parser.add_argument("-g", type=int, default=256)
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"date": dt.date.today().isoformat(), "config": args.config, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "copy_bandwidth_gb_s": round(measured_bandwidth(device) / 1e9, 1), "ours": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = make_checkpoint(tmp / "ckpt", args.config, device)
        print(f"checkpoint built in {time.perf_counter() - t0:.0f} s", flush=True)
        for quant in args.quant:
            t0 = time.perf_counter()
            bundle = convert(str(ckpt), tmp / quant, quant=quant, backend="torch", log=None)
            print(f"{quant}: converted in {time.perf_counter() - t0:.0f} s", flush=True)
            engine = Engine(bundle, backend="torch", device=str(device))
            t0 = time.perf_counter()
            r = bench(engine, args.p, args.g, args.n)
            r["first_bench_incl_compile_s"] = round(time.perf_counter() - t0, 1)
            r["chunked_prefill_tok_s"] = round(chunked_prefill(engine, args.prefill_tokens, args.prefill_tokens), 1)
            if device.type == "cuda":
                r["profile_host_calls"] = profile_decode(engine)
                print("  profiler:", r["profile_host_calls"])
            results["ours"][quant] = r
            print(format_bench(r), f"\n  chunked prefill of {args.prefill_tokens}: {r['chunked_prefill_tok_s']} tok/s",
                  flush=True)
            del engine
            torch.cuda.empty_cache() if device.type == "cuda" else None
        if not args.no_peer:
            peer = transformers_peer(ckpt, device, args.p, args.g)
            results["transformers_bf16_eager"] = peer
            print(f"transformers bf16: prefill {peer['prefill_tok_s']:.1f} tok/s, decode {peer['decode_tok_s']:.1f} tok/s")
            for quant, r in results["ours"].items():
                print(f"  ratio lmbundle {quant} / transformers: decode {r['decode_tok_s'] / peer['decode_tok_s']:.1f}x, "
                      f"prefill {r['prefill_tok_s'] / peer['prefill_tok_s']:.1f}x")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
