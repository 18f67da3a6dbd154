"""On this CPU, one run: the Core AI backend (the shipped .aimodel on Apple's Linux runtime), our PyTorch
backend, and transformers, on the same bundle / checkpoint and the same prompt.

  python benchmarks/bench_cpu.py [--checkpoint lmbundle/data/demo/qwen35-tiny] [-p 32 -g 32]
  python benchmarks/bench_cpu.py --checkpoint CKPT_OF_A_REAL_CONFIG --backends torch -p 16 -g 16 -n 2

The Linux Core AI runtime is a single-threaded reference interpreter: it proves the .aimodel computes
the right tokens; its speed belongs to Apple hardware. Figures are decode tok/s after a 1-token warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.bench import bench, prompt_ids  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402


def transformers_decode(checkpoint: str, ids: list[int], g: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])

    def timed(n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    timed(2)
    return (g - 1) / (timed(g) - timed(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="lmbundle/data/demo/qwen35-tiny")
    parser.add_argument("--quant", default="int8hu")
    parser.add_argument("-p", type=int, default=32)
    parser.add_argument("-g", type=int, default=32)
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["torch", "coreai"], choices=["torch", "coreai"],
                        help="coreai takes seconds to minutes a step on real configs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = convert(args.checkpoint, Path(tmp) / "b", quant=args.quant,
                         backend="all" if "coreai" in args.backends else "torch", log=None)
        results = {"threads": torch.get_num_threads(), "checkpoint": args.checkpoint, "quant": args.quant}
        for backend in args.backends:
            engine = Engine(bundle, backend=backend, device="cpu" if backend == "torch" else None)
            r = bench(engine, args.p, args.g, args.n if backend == "torch" else 1)
            results[backend] = {k: r[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_memory_bytes")}
        ids = prompt_ids(engine, args.p)  # the prompt bench fed
        results["transformers_fp32"] = {"decode_tok_s": round(transformers_decode(args.checkpoint, ids, args.g), 2)}
    h = results["transformers_fp32"]["decode_tok_s"]
    ours = {k: results[k]["decode_tok_s"] for k in args.backends}
    print("decode tok/s: " + " | ".join(f"lmbundle {k} {v:.2f}" for k, v in ours.items()) + f" | transformers fp32 {h:.2f}")
    print("ratios: " + ", ".join(f"{k}/transformers {v / h:.2f}x" for k, v in ours.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
