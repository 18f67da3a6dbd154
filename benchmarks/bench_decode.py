"""Decode and prefill speed of lmbundle vs transformers on the same random-weight checkpoint, one run.

Builds a Qwen3.5 checkpoint at a real config (random bf16 weights: decode speed does not depend on the
values) with transformers' own class, converts it to lmbundle bundles, and measures, with the seed's
llm-benchmark protocol (p prompt tokens, g generated, n trials after a 1-token warm-up):
  - our engine (PyTorch backend; CUDA graphs + fused int8 GEMV on CUDA) per quant mode,
  - chunked prefill of a long prompt,
  - transformers (bf16, not compiled, its default attention) greedy generate, twice, each in its own process
    (benchmarks/peer_transformers.py): with its default torch GDN path, and with the flash-linear-attention
    Triton kernels unpacked from the wheels in --fla-wheels (skipped, with a note, when there are none),
  - llama.cpp CUDA (--llama-cpp .llama, from `benchmarks/llama_cpp.py fetch`): llama-bench is built in the
    background while ours run, then the same checkpoint is converted to GGUF (q8_0, bf16) and benched,
and prints the ratios. Usage (GPU; scripts/fetch_peer_wheels.sh first, and carry .peer and .llama to the GPU machine):
  python benchmarks/bench_decode.py --config Qwen3.5-2B --quant int8hu fp16 -p 128 -g 256 -n 3 --llama-cpp .llama
Each run writes its JSON into --results-dir (benchmarks/results/ by default; RESULTS.md summarizes the latest).
--config Qwen3-VL-2B builds Qwen3VLForConditionalGeneration instead (text + the real vision tower, which the
bundle carries but the bench never runs: text-only decode); its transformers peer loads
AutoModelForImageTextToText, and there is no fla peer (Qwen3-VL has no gated-delta layers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.bench import bench, format_bench, measured_bandwidth, prompt_ids  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.engine.request import Request  # noqa: E402
from tests import checkpoints  # noqa: E402

# Qwen3-VL-2B-Instruct (../shared/reference/qwen-facts.md). transformers' Qwen3VLConfig defaults are the 8B's
# (text 4096 x 32 layers; vision depth 27, hidden 1152, out 3584, deepstack [8,16,24]) and untied: every value
# is spelled out here. The token ids are the real ones; the bench's tokenizer is a small stand-in (text-only decode).
VL_CONFIGS = {
    "Qwen3-VL-2B": {
        "text_config": {
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "attention_bias": False,
            "bos_token_id": 151643, "eos_token_id": 151645,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True},
        },
        "vision_config": {
            "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048,
            "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh",
        },
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": True,
    },
}
# Qwen3-VL's image processor settings (convert reads them for the bundle's vision section).
VL_PROCESSOR = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 65536, "longest_edge": 16777216}}


def make_vl_checkpoint(folder: Path, config: dict, device: torch.device) -> Path:
    import copy

    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(config))).to(torch.bfloat16)
    model.save_pretrained(folder)
    checkpoints.make_tokenizer(folder, 512)
    Qwen2VLImageProcessorPil(**VL_PROCESSOR).save_pretrained(folder)
    del model
    return folder


def make_checkpoint(folder: Path, name: str, device: torch.device) -> Path:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    if name in VL_CONFIGS:
        return make_vl_checkpoint(folder, VL_CONFIGS[name], device)
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


def time_to_first_token(engine: Engine, tokens: int) -> float:
    """What `run`/`chat`/`serve` take to the first token of a cold prompt (chunks of 256, prefix-cache
    snapshots at its cut points included), best of 3."""
    ids = prompt_ids(engine, tokens, 11, 17)
    best = float("inf")
    for _ in range(3):
        engine.forget()
        stats = engine.complete(Request(ids, max_tokens=1, ignore_eos=True, prefill_chunk=256)).stats
        best = min(best, stats.prefill_seconds)
    return best


def profile_decode(engine: Engine, steps: int = 32) -> str:
    """Host-side calls per decoded token in the steady state: one graph launch and one token read."""
    ids = [(17 + 31 * i) % 1000 for i in range(64)]
    engine.complete(Request(ids, max_tokens=8, ignore_eos=True))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.complete(Request(ids, max_tokens=steps, ignore_eos=True))
    rows = {e.key: e.count for e in prof.key_averages()}
    keep = ("cudaGraphLaunch", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
            "aten::item", "aten::_local_scalar_dense")
    return ", ".join(f"{k}: {rows[k]}" for k in keep if k in rows) + f" (for {steps} tokens + {len(ids)} prompt steps)"


PEERS = {"transformers_bf16_eager": "transformers bf16 eager",
         "transformers_bf16_fla": "transformers bf16 + fla kernels (causal-conv1d not installed: torch conv)"}


def install_fla(wheels: Path, target: Path) -> Path | None:
    """Unpack the flash-linear-attention wheels (pure Python + Triton) into a folder for the second peer's PYTHONPATH.

    --no-index: the GPU machine has no network, the wheels travel with the repo (scripts/fetch_peer_wheels.sh).
    --no-deps: its image has torch, triton and einops; causal-conv1d ships only as a source tarball, so it is left
    out and transformers keeps its torch conv.
    """
    if not list(wheels.glob("fla_core-*.whl")):
        print(f"no fla wheels in {wheels} (scripts/fetch_peer_wheels.sh fetches them): skipping the fla peer")
        return None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    *map(str, sorted(wheels.glob("*.whl")))], check=True)
    return target


def run_peer(ckpt: Path, device: torch.device, p: int, g: int, pythonpath: Path | None = None) -> dict:
    """benchmarks/peer_transformers.py in a fresh process: transformers picks its GDN kernels (fla or torch) at
    import, so the two peers cannot share one process; its own process also frees its GPU memory when done."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).with_name("peer_transformers.py")), "--checkpoint", str(ckpt),
           "-p", str(p), "-g", str(g), "--device", device.type]
    proc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, text=True)  # stderr goes to ours
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit status {proc.returncode}, no result (stderr above)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="Qwen3.5-2B", choices=sorted(checkpoints.REAL_CONFIGS) + sorted(VL_CONFIGS))
    parser.add_argument("--quant", nargs="+", default=["int8hu", "fp16"])
    parser.add_argument("-p", type=int, default=128)
    parser.add_argument("-g", type=int, default=256)
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--prefill-chunks", type=int, nargs="*", default=[256],
                        help="also time the long prompt fed in chunks of these sizes (run/chat/serve use 256)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--fla-wheels", default=str(REPO / ".peer" / "wheels"),
                        help="flash-linear-attention wheels for the second peer (scripts/fetch_peer_wheels.sh)")
    parser.add_argument("--llama-cpp", help="llama.cpp source folder from benchmarks/llama_cpp.py fetch (built here)")
    parser.add_argument("--llama-types", nargs="+", default=["q8_0", "bf16"])
    parser.add_argument("-j", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="llama.cpp build jobs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = dt.datetime.now(dt.timezone.utc)
    build = None
    if args.llama_cpp:
        from benchmarks import llama_cpp

        build = llama_cpp.Background(Path(args.llama_cpp), args.j, Path(tempfile.gettempdir()) / "llama-build.log")
    results = {"date": started.isoformat(timespec="seconds"), "config": args.config, "torch": torch.__version__,
               "command": " ".join(["python3", "benchmarks/bench_decode.py", *sys.argv[1:]]),
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
            t0 = time.perf_counter()
            r["long_prompt_tok_s"] = round(chunked_prefill(engine, args.prefill_tokens, args.prefill_tokens), 1)
            r["long_prompt_by_chunk_tok_s"] = {chunk: round(chunked_prefill(engine, args.prefill_tokens, chunk), 1)
                                               for chunk in args.prefill_chunks}
            r["long_prompt_bench_s"] = round(time.perf_counter() - t0, 1)  # graph captures included
            r["long_prompt_ttft_s"] = round(time_to_first_token(engine, args.prefill_tokens), 4)
            if device.type == "cuda":
                r["profile_host_calls"] = profile_decode(engine)
                print("  profiler:", r["profile_host_calls"])
            results["ours"][quant] = r
            print(format_bench(r), f"\n  chunked prefill of {args.prefill_tokens}: {r['long_prompt_tok_s']} tok/s "
                  f"(in chunks of {r['long_prompt_by_chunk_tok_s']}); run/chat/serve first token after "
                  f"{1000 * r['long_prompt_ttft_s']:.1f} ms",
                  flush=True)
            del engine
            torch.cuda.empty_cache() if device.type == "cuda" else None
        if build is not None:
            write_results(args, started, results)  # ours, in case the peer's build outlasts the call
            try:
                results["llama_cpp_build_s"] = round(build.wait(), 1)
                print(f"llama.cpp built ({results['llama_cpp_build_s']} s since the start)", flush=True)
                results["llama_cpp"] = llama_cpp.side_by_side(Path(args.llama_cpp), ckpt, args.llama_types, args.p,
                                                              args.g, tmp)
            except Exception as exc:  # noqa: BLE001 - report ours anyway
                results["llama_cpp"] = {"error": str(exc)[-3000:]}
                print("llama.cpp:", results["llama_cpp"]["error"], flush=True)
            for outtype, peer in results["llama_cpp"].items():
                if isinstance(peer, dict) and "decode_tok_s" in peer:
                    for quant, r in results["ours"].items():
                        print(f"  ratio lmbundle {quant} / llama.cpp {outtype}: decode "
                              f"{r['decode_tok_s'] / peer['decode_tok_s']:.2f}x, S=1 prompt "
                              f"{r['prefill_tok_s'] / peer.get('prompt_tok_s', float('nan')):.2f}x, run/chat/serve "
                              f"prompt {r['chunked_prefill_tok_s'] / peer.get('prompt_tok_s', float('nan')):.2f}x, "
                              f"2k prompt {r['long_prompt_tok_s'] / peer.get('prompt_tok_s', float('nan')):.2f}x",
                              flush=True)
        if not args.no_peer:
            vl = args.config in VL_CONFIGS
            if vl:
                print("Qwen3-VL has no gated-delta layers: one transformers peer (no fla peer)")
            fla = None if vl else install_fla(Path(args.fla_wheels), tmp / "fla")
            for key, pythonpath in [("transformers_bf16_eager", None), ("transformers_bf16_fla", fla)]:
                if key == "transformers_bf16_fla" and fla is None:
                    continue
                peer = results[key] = run_peer(ckpt, device, args.p, args.g, pythonpath)
                origin = {k: (v or "nn.Conv1d").split(".")[0] for k, v in peer.get("gdn", {}).items()}
                if vl:
                    print(f"{PEERS[key]}: {peer.get('model_class')}, attention {peer.get('attn_implementation')}")
                else:
                    print(f"{PEERS[key]}: GDN kernels from {origin}; fla {peer.get('fla_error', peer.get('fla'))}")
                if "decode_tok_s" not in peer or (pythonpath and origin.get("chunk") != "fla"):
                    print("  failed:", peer.get("error", "fla's kernels were not picked up"), "- no ratios", flush=True)
                    continue
                print(f"  prefill {peer['prefill_tok_s']:.1f} tok/s, decode {peer['decode_tok_s']:.1f} tok/s")
                for quant, r in results["ours"].items():
                    print(f"  ratio lmbundle {quant} / {PEERS[key]}: "
                          f"decode {r['decode_tok_s'] / peer['decode_tok_s']:.1f}x, "
                          f"prefill {r['prefill_tok_s'] / peer['prefill_tok_s']:.1f}x", flush=True)
    print(json.dumps({k: v for k, v in results.items() if k != "llama_cpp"}))
    write_results(args, started, results)


def write_results(args, started, results: dict) -> None:
    """--json and the results folder (one file per run, named by its start)."""
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    if args.results_dir:
        folder = Path(args.results_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{started:%Y%m%dT%H%M%SZ}-{args.config}-{'-'.join(args.quant)}.json"
        (folder / name).write_text(text)
        print(f"results: {folder / name}")


if __name__ == "__main__":
    main()
