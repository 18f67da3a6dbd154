"""transformers' greedy generate on a checkpoint, timed with bench_decode.py's protocol; prints one JSON line.

A script of its own because transformers chooses the gated-delta kernels once, when its Qwen3.5 modeling module
is imported (fla's if `fla` imports, else its torch reference): bench_decode.py runs it twice, in fresh processes,
without and with the flash-linear-attention wheels on PYTHONPATH. It reports which functions the GDN layers really
call, so a label never claims fla kernels that did not load. An image-text checkpoint (Qwen3-VL: AutoModelForCausalLM
does not take its config) loads through AutoModelForImageTextToText and is timed on text-only prompts.
Usage: python benchmarks/peer_transformers.py --checkpoint DIR -p 128 -g 256 [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time

import torch


def fla_status() -> dict:
    """Import fla's gated-delta ops as transformers would, but keep the error that transformers swallows."""
    if importlib.util.find_spec("fla") is None:
        return {"fla": None}
    try:
        import fla
        importlib.import_module("fla.ops.gated_delta_rule")
        return {"fla": fla.__version__, "fla_path": fla.__path__[0]}
    except Exception as e:  # noqa: BLE001 - whatever broke, report it
        return {"fla": "import failed", "fla_error": f"{type(e).__name__}: {e}"}


def gdn_kernels(model) -> dict:
    """`module.qualname` of the functions a GDN layer calls (None: the layer's own nn.Conv1d).

    transformers 5.x (5.17 and 5.23 alike) decorates its torch references with
    `use_kernel_func_from_hub_with_fallback`, whose wrapper keeps the chosen function in its closure as
    `implementation` (the wrapper's own __module__/__name__ are the torch reference's); 4.x put the chosen one on
    the layer (`self.chunk_gated_delta_rule`, ...). Look in both places.
    """
    layer = next((m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")), None)
    if layer is None:  # no GDN layers (Qwen3-VL)
        return {}
    modeling = sys.modules[type(layer).__module__]
    out = {}
    for key, attr, module_attr in [("chunk", "chunk_gated_delta_rule", "torch_chunk_gated_delta_rule"),
                                   ("recurrent", "recurrent_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
                                   ("conv", "causal_conv1d_fn", "causal_conv1d_fn"),
                                   ("conv_update", "causal_conv1d_update", "causal_conv1d_update")]:
        fn = getattr(layer, attr, None) or getattr(modeling, module_attr, None)
        if fn is not None and getattr(fn, "__closure__", None):
            fn = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__))).get("implementation", fn)
        out[key] = None if fn is None else f"{fn.__module__}.{fn.__qualname__}"
    return out


def measure(checkpoint: str, device: torch.device, p: int, g: int) -> dict:
    """Same protocol as our bench: warm-up, then prefill = p / time-to-first-token, decode = (g-1) / (total-first)."""
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(checkpoint).model_type
    auto = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForImageTextToText
    model = auto.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device).eval()
    result = {"transformers": transformers.__version__, "attn_implementation": model.config._attn_implementation,
              "model_class": type(model).__name__, "gdn": gdn_kernels(model)}
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[(17 + 31 * i) % 1000 % vocab for i in range(p)]], device=device)

    def timed(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        timed(2)  # warm-up (also compiles fla's Triton kernels for both the chunked and the recurrent path)
        first = timed(1)
        total = timed(g)
        result.update(prefill_tok_s=p / first, decode_tok_s=(g - 1) / (total - first))
    except Exception as e:  # noqa: BLE001 - e.g. fla's Triton kernels on a CPU: report, don't hide the JSON
        result["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("-p", type=int, default=128)
    parser.add_argument("-g", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    result = fla_status()
    result.update(measure(args.checkpoint, torch.device(args.device), args.p, args.g))
    print(json.dumps(result), flush=True)
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
