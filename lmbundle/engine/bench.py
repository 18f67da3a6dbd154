"""`lmbundle bench`: the seed's llm-benchmark protocol on our engine.

A synthetic prompt of p tokens, g generated tokens, n trials after a 1-token warm-up. Prefill tok/s =
p / time to first token; decode tok/s = (g - 1) / time after the first token (medians). The protocol
feeds the prompt as S=1 steps (prompt speed = decode speed, as on the seed's engine); the same prompt
fed in chunks (what `run`, `chat` and `serve` do) is timed too, so both prompt speeds are shown. The bandwidth
figure divides bytes read per token by the time per token and compares it with a device copy measured
in the same run (the achievable ceiling, not the data-sheet number).
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch

from .. import __version__
from .engine import Engine
from .request import Request
from .torch_backend import TorchBackend


def measured_bandwidth(device: torch.device, size: int = 1 << 28) -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical ceiling for a decode step."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def prompt_ids(engine: Engine, count: int, offset: int = 17, stride: int = 31) -> list[int]:
    """A synthetic prompt of `count` ordinary token ids (like llm-benchmark's), none of them special: a
    chat-message marker among them would make the engine cut the prompt there for the prefix cache, and
    the figure would time pieces a plain prompt never has."""
    tokenizer = engine.tokenizer
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ordinary = [i for i in range(min(engine.vocab_size, 1000)) if i not in special]
    return [ordinary[(offset + stride * i) % len(ordinary)] for i in range(count)]


def bench(engine: Engine, prompt_tokens: int = 128, gen_tokens: int = 256, trials: int = 3,
          prefill_chunk: int = 0, chunked_prefill: int = 256) -> dict:
    """The protocol's figures with `prefill_chunk` (0: S=1 steps), plus the time to first token of the
    same prompt fed in chunks of `chunked_prefill` tokens (0: not measured), after one untimed run that
    captures its graph (as `serve` does at start)."""
    ids = prompt_ids(engine, prompt_tokens)
    engine.check_length(prompt_tokens, gen_tokens)
    engine.warmup()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(trials):
        engine.forget()  # each trial feeds the whole prompt: a cached prefix would time nothing
        runs.append(engine.complete(Request(ids, max_tokens=gen_tokens, ignore_eos=True,
                                            prefill_chunk=prefill_chunk)).stats)
    decode = statistics.median(r.decode_tok_s for r in runs)
    prefill = statistics.median(r.prefill_tok_s for r in runs)
    ttft = statistics.median(r.prefill_seconds for r in runs)
    chunked = []
    for trial in range(trials + 1 if chunked_prefill else 0):  # the first, untimed, captures the prompt's graph
        engine.forget()
        stats = engine.complete(Request(ids, max_tokens=1, ignore_eos=True, prefill_chunk=chunked_prefill)).stats
        if trial:
            chunked.append(stats)
    bpt, copies = engine.bundle.info["bytes_per_token"], 0
    if isinstance(engine.backend, TorchBackend):  # the weights as loaded (the CPU expands int8 to fp32)
        from ..bundle.quant import bytes_per_token as weights_read

        bpt, copies = weights_read(engine.backend.model), engine.backend.prompt_copies_bytes
    mean_context = prompt_tokens + gen_tokens / 2
    bytes_per_token = bpt["total_at_empty_context"] + bpt["kv_per_position"] * mean_context
    ceiling = measured_bandwidth(engine.device) if engine.backend_name == "torch" else None
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        device_name = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        device_name = f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
    achieved = bytes_per_token * decode
    return {
        "bundle": engine.name, "backend": engine.backend_name, "device": device_name,
        "quant": engine.bundle.info["quant"]["mode"], "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "trials": trials, "prefill": "chunked" if prefill_chunk else "s1",
        "cached_tokens": max(r.cached_tokens for r in runs + chunked),  # 0: every trial fed the whole prompt
        "prefill_tok_s": round(prefill, 2), "decode_tok_s": round(decode, 2), "ttft_s": round(ttft, 4),
        "chunked_prefill": chunked_prefill or None,
        "chunked_prefill_tok_s": round(statistics.median(r.prefill_tok_s for r in chunked), 2) if chunked else None,
        "chunked_ttft_s": round(statistics.median(r.prefill_seconds for r in chunked), 4) if chunked else None,
        "peak_memory_bytes": peak, "prompt_copies_bytes": copies,
        "bytes_per_token": int(bytes_per_token),
        "achieved_bandwidth_gb_s": round(achieved / 1e9, 2),
        "measured_copy_bandwidth_gb_s": round(ceiling / 1e9, 2) if ceiling else None,
        "bandwidth_fraction": round(achieved / ceiling, 4) if ceiling else None,
        "lmbundle": __version__, "torch": torch.__version__,
    }


def format_bench(r: dict) -> str:
    lines = [
        f"{r['bundle']} [{r['quant']}] on {r['device']} ({r['backend']} backend), "
        f"p={r['prompt_tokens']} g={r['gen_tokens']} n={r['trials']}, prefill {r['prefill']}",
        f"  prefill {r['prefill_tok_s']:.1f} tok/s (TTFT {1000 * r['ttft_s']:.1f} ms)   decode {r['decode_tok_s']:.1f} tok/s",
        *([f"  prefill in chunks of {r['chunked_prefill']} (run/chat/serve): {r['chunked_prefill_tok_s']:.1f} tok/s "
           f"(TTFT {1000 * r['chunked_ttft_s']:.1f} ms)"] if r.get("chunked_prefill_tok_s") else []),
        f"  reads {r['bytes_per_token'] / 1e6:.2f} MB/token -> {r['achieved_bandwidth_gb_s']:.1f} GB/s"
        + (f" = {100 * r['bandwidth_fraction']:.1f}% of the measured copy bandwidth "
           f"({r['measured_copy_bandwidth_gb_s']:.0f} GB/s)" if r["bandwidth_fraction"] else ""),
        f"  peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB"
        + (f" ({r['prompt_copies_bytes'] / 2**20:.0f} MiB of it: int8 weights kept expanded for prompts)"
           if r.get("prompt_copies_bytes") else ""),
    ]
    return "\n".join(lines)
