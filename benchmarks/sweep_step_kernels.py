"""Block sizes of the fused decode kernels at Qwen3.5-2B shapes: time per call of each candidate.

Each GEMV kind of a decode step (with its fused prologue/epilogue) and the GDN delta-rule kernel are
replayed in a CUDA graph over enough weight copies to overflow L2, with PDL as the engine launches them;
prints microseconds and TB/s of weight bytes per candidate, best first. The winners go in
`triton_gemv.pick_config` and `triton_mixers.gated_delta_step`.
    python3 benchmarks/sweep_step_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_int8_gemv import int8_copies, seconds_per_call  # noqa: E402
from lmbundle.engine.kernels import triton_gemv, triton_mixers  # noqa: E402

HIDDEN, INTER, VOCAB, HK, HV, DK, DV = 2048, 6144, 248320, 16, 16, 128, 128
CONV = 2 * HK * DK + HV * DV
GEMVS = {  # kind: (out, in, fused parts)
    "gdn in_proj + norm + conv": (CONV + HV * DV + 2 * HV, HIDDEN, {"norm", "conv"}),
    "gdn out_proj + gated norm + residual": (HIDDEN, HV * DV, {"gated", "residual"}),
    "mlp gate/up + norm + swiglu": (INTER, HIDDEN, {"norm", "swiglu"}),
    "mlp down + residual": (HIDDEN, INTER, {"residual"}),
    "attn qkv + norm": (4096 + 1024, HIDDEN, {"norm"}),
    "attn o_proj + residual": (HIDDEN, 2048, {"residual"}),
    "lm_head + norm": (VOCAB, HIDDEN, {"norm"}),
}
CANDIDATES = [(n, g, w, True) for n, (g, w) in itertools.product((8, 16, 32), ((16, 4), (32, 4), (64, 8)))]


def sweep_gemv(kind: str, pdl: bool) -> list[tuple[float, tuple]]:
    """Seconds per call of the default config and each candidate, best first."""
    out_features, in_features, parts = GEMVS[kind]
    nbytes = out_features * in_features * (2 if "swiglu" in parts else 1) * 34 // 32
    weights = int8_copies(out_features, in_features)
    ups = int8_copies(out_features, in_features) if "swiglu" in parts else [(None, None)] * len(weights)
    x = torch.randn(in_features, device="cuda", dtype=torch.bfloat16)
    kwargs = {}
    if "norm" in parts:
        kwargs["norm"] = (torch.rand(in_features, device="cuda") * 0.1, 1e-6, True)
    if "residual" in parts:
        kwargs["residual"] = torch.randn(out_features, device="cuda", dtype=torch.bfloat16)
    if "conv" in parts:
        kwargs["conv"] = (torch.zeros(CONV, 3, device="cuda", dtype=torch.bfloat16),
                          torch.randn(CONV, 4, device="cuda") * 0.3)
    if "gated" in parts:
        kwargs["gated_norm"] = triton_gemv.GatedNormInput(
            x, torch.rand(HV, 4, device="cuda"), torch.randn(in_features, device="cuda", dtype=torch.bfloat16),
            torch.rand(DV, device="cuda"), 1e-6, DV)
    results = []
    default = triton_gemv.pick_config(out_features, in_features, bool(parts & {"norm", "gated"}), "swiglu" in parts)
    for config in dict.fromkeys([default, *CANDIDATES]):
        calls = [lambda w=w, u=u: triton_gemv.gemv(x, *w, *u, pdl=pdl, config=config, **kwargs)
                 for w, u in zip(weights, ups)]
        results.append((seconds_per_call(calls, nbytes), config))
    return sorted(results)


def sweep_gdn(pdl: bool) -> list[tuple[float, tuple]]:
    copies = 64  # 1 MB of fp32 state each
    projected = torch.randn(CONV + HV * DV + 2 * HV, device="cuda", dtype=torch.bfloat16)
    states = [torch.randn(HV, DK, DV, device="cuda") * 0.01 for _ in range(copies)]
    a_log, dt_bias = torch.rand(HV, device="cuda"), torch.rand(HV, device="cuda")
    results = []
    for block_v, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
        calls = [lambda s=s: triton_mixers.gated_delta_step(projected, a_log, dt_bias, s, (HK, HV), (DK, DV), pdl,
                                                            block_v, warps) for s in states]
        results.append((seconds_per_call(calls, 2 * HV * DK * DV * 4), (block_v, warps)))
    return sorted(results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--no-pdl", action="store_true")
    args = parser.parse_args()
    pdl = not args.no_pdl
    report = {"device": torch.cuda.get_device_name(), "pdl": pdl, "gemv": {}, "gdn": None}
    for kind, (out_features, in_features, parts) in GEMVS.items():
        ranked = sweep_gemv(kind, pdl)
        nbytes = out_features * in_features * (2 if "swiglu" in parts else 1) * 34 // 32
        default = triton_gemv.pick_config(out_features, in_features, bool(parts & {"norm", "gated"}),
                                          "swiglu" in parts)
        default_s = next(s for s, c in ranked if c == default)
        print(f"{kind} [{out_features}x{in_features}]: default {default} {1e6 * default_s:.1f} us")
        for seconds, config in ranked[:6]:
            print(f"   {config}: {1e6 * seconds:7.1f} us  {nbytes / seconds / 1e12:.2f} TB/s")
        report["gemv"][kind] = [(s, c) for s, c in ranked]
    ranked = sweep_gdn(pdl)
    print("gdn delta rule (block_v, warps):")
    for seconds, config in ranked[:5]:
        print(f"   {config}: {1e6 * seconds:6.1f} us")
    report["gdn"] = ranked
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
