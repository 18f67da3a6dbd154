"""What a bundle is made of, against the checkpoint: the recipe its declared mode implies, and every
weight tensor, row by row, as that recipe makes it from the checkpoint's (decoder, vision encoder, and on
Core AI each constant the `.aimodel`'s functions read, in place: `aimodel.py`).

The expected recipe comes from the mode the bundle declares (`quant.mode` and its head), the way
`convert --quant/--head-quant` plans it (`bundle.quant.plan_recipe`) for the checkpoint's graph; it is
never read back from the bundle, so a body quantized another way than declared fails here.
"""

from __future__ import annotations

import dataclasses

import torch

from ..bundle.format import PREFILL_CHUNK, Bundle
from ..bundle.load import build_graph
from ..bundle.quant import BLOCK, HEAD_QUANTS, check_mode, plan_recipe
from ..bundle.vision import read_vision
from ..errors import LmbundleError
from ..models.linear import dequantize, quantize_absmax
from ..models.vision import sanitize
from .aimodel import FunctionCheck, check_functions, expected_parts, meta_graph
from .oracle import Oracle, quantized_like_bundle


def check_config(bundle: Bundle, oracle: Oracle) -> list[str]:
    """The bundle's graph config against the one the oracle checkpoint implies."""
    ckpt = oracle.checkpoint
    arch = ckpt.architecture
    expected = dataclasses.asdict(arch.config.from_hf(ckpt.text_config, ckpt.tie_word_embeddings))
    ours = bundle.info.get("config", {})
    differ = [f"{k}={ours.get(k)!r} (oracle {v!r})" for k, v in expected.items() if ours.get(k) != v]
    differ += [f"{k} not in the oracle's config" for k in ours if k not in expected]
    if bundle.info.get("architecture") != arch.name:
        differ.insert(0, f"architecture {bundle.info.get('architecture')!r} (oracle {arch.name!r})")
    return [f"config differs from the oracle's: {', '.join(differ[:3])}"] if differ else []


def declared_mode(bundle: Bundle) -> tuple[str, str]:
    """(quant mode, head quant) the bundle declares; int8hu's head from its recorded kind."""
    quant = bundle.info["quant"]
    mode = quant.get("mode")
    head = str(quant.get("head", "")).removeprefix("int8-") if mode == "int8hu" else "block32"
    try:
        check_mode(mode, head if head in HEAD_QUANTS else "?")
    except LmbundleError as exc:
        raise LmbundleError(f"{bundle.path}: the declared quantization is not one lmbundle makes ({exc})") from None
    return mode, head


def expected_recipe(bundle: Bundle, oracle: Oracle) -> tuple[dict, list[str]]:
    """The recipe the declared mode implies for the checkpoint's graph, and how the bundle's own recipe
    (and its Apple `compression` record) differ from it."""
    mode, head = declared_mode(bundle)
    ckpt = oracle.checkpoint
    cfg = ckpt.architecture.config.from_hf(ckpt.text_config, ckpt.tie_word_embeddings)
    with torch.device("meta"):
        graph = build_graph(ckpt.architecture.model, cfg, torch.float16)
    expected = plan_recipe(graph, mode, head)
    ours = bundle.info["quant"]
    differ = []
    for module in sorted(set(expected["int8_linears"]) | set(ours.get("int8_linears", {}))):
        want, got = expected["int8_linears"].get(module), ours.get("int8_linears", {}).get(module)
        if want != got:
            differ.append(f"{module} {_layout(got)} (declared {_layout(want)})")
    differ += [f"{key} {ours.get(key)!r} (declared {expected[key]!r})" for key in ("tied_head", "head", "block")
               if ours.get(key) != expected[key]]
    compression = bundle.metadata.get("compression")
    declared = None if mode == "fp16" else {"scheme": mode, "granularity": f"per_block_{BLOCK}",
                                             "head": expected["head"], "symmetric": "absmax"}
    if compression != declared:
        differ.append(f"metadata compression {compression} (the mode implies {declared})")
    if not differ:
        return expected, []
    return expected, [f"recipe differs from the declared {mode}{'/' + head if mode == 'int8hu' else ''}: "
                      f"{', '.join(differ[:3])}{'...' if len(differ) > 3 else ''}"]


def _layout(block: int | None) -> str:
    return "fp16" if block is None else f"int8 per {block}"


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _bad_rows(name: str, ours: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> str | None:
    """None when every row is within `tol`, else the tensor and its first differing rows."""
    if ours.shape != expected.shape:
        return f"{name} shape {tuple(ours.shape)} (oracle {tuple(expected.shape)})"
    over = ((ours - expected).abs() > tol).reshape(max(ours.shape[0] if ours.ndim else 1, 1), -1).any(-1)
    if not over.any():
        return None
    rows = over.nonzero().flatten().tolist()
    return f"{name} rows {rows[:4]}{'...' if len(rows) > 4 else ''}"


def _fp16_tolerance(expected: torch.Tensor) -> torch.Tensor:
    return expected.abs() * 2.0**-10 + 1e-7  # one fp16 ulp (fp32 parameters are exact)


def check_weights(bundle: Bundle, oracle: Oracle, recipe: dict) -> tuple[int, list[str]]:
    """Every decoder tensor of the bundle against `recipe` applied to the checkpoint's, row by row: int8
    rows within one step of their block (absmax rounding is deterministic: a clean bundle is exact),
    float rows within one fp16 ulp; none missing, none extra. Returns (tensors checked, the bad ones)."""
    source = oracle.text_parameters()
    tensors = _tensors(bundle.path / bundle.info["weights"])
    bad, checked = [], 0
    for name in sorted(n for n in source if not (n == "lm_head.weight" and recipe.get("tied_head"))):
        module = name.removesuffix(".weight")
        block = recipe["int8_linears"].get(module)
        if f"{module}.qweight" in tensors:
            qweight, scales = tensors.pop(f"{module}.qweight"), tensors.pop(f"{module}.scales", None)
            ours_block = qweight.shape[1] // scales.shape[1] if scales is not None and scales.ndim == 2 else None
            if ours_block != block:
                bad.append(f"{module} int8 per {ours_block} (recipe {_layout(block)})")
                continue
            ours = dequantize(qweight, scales, torch.float32)
        elif name in tensors and block is None:
            ours = tensors.pop(name).float()
        else:
            bad.append(f"{name} missing" + (f" (recipe int8 per {block})" if block else ""))
            continue
        checked += 1
        expected = quantized_like_bundle(name, source[name].data, recipe)
        if block:  # one int8 step of the recipe's block (absmax rounding is deterministic: a clean bundle is exact)
            _, steps = quantize_absmax(source[name].data.float(), block)
            tol = 1.01 * steps.float().repeat_interleave(block, dim=1)
        else:
            tol = _fp16_tolerance(expected)
        problem = _bad_rows(name, ours, expected, tol)
        if problem:
            bad.append(problem)
    bad += [f"{extra} not in the oracle" for extra in sorted(tensors)]
    return checked, bad


def check_vision_weights(bundle: Bundle, oracle: Oracle) -> tuple[int, list[str]]:
    """The vision encoder's tensors (`vision.safetensors`) against the checkpoint's vision tower in the
    recipe's fp16, row by row; none missing, none extra. (0, []) for a text bundle."""
    info = read_vision(bundle)
    if info is None:
        return 0, []
    tensors = _tensors(info.weights)
    bad, checked = [], 0
    for name, weight in sanitize(oracle.checkpoint.vision_tensors()):
        if name not in tensors:
            bad.append(f"vision {name} missing")
            continue
        checked += 1
        expected = weight.to(torch.float16).float()
        problem = _bad_rows(f"vision {name}", tensors.pop(name).float(), expected, _fp16_tolerance(expected))
        if problem:
            bad.append(problem)
    bad += [f"vision {extra} not in the oracle" for extra in sorted(tensors)]
    return checked, bad


def check_aimodel(bundle: Bundle, oracle: Oracle, recipe: dict) -> list[FunctionCheck]:
    """Core AI runs the `.aimodel`, not the safetensors: each function's constants, read in place,
    against `recipe` applied to the checkpoint (`aimodel.py`). [] for a bundle without one."""
    asset = bundle.aimodel_path
    if asset is None:
        return []
    ckpt = oracle.checkpoint
    arch = ckpt.architecture
    cfg = arch.config.from_hf(ckpt.text_config, ckpt.tie_word_embeddings)
    source = {name: param.data for name, param in oracle.text_parameters().items()}
    parts = expected_parts(source, recipe, cfg.norm_zero_centered, oracle.rope_inv_freq())
    chunk = int(bundle.metadata["language"].get("prefill_chunk_size", PREFILL_CHUNK))
    return check_functions(asset, meta_graph(arch, cfg, recipe), parts, bundle.metadata.get("vision"), chunk)
