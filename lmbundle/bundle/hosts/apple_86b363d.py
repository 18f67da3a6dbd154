"""Apple's `coreai-pipelined` engine at the 86b363d snapshot (the code at hand): one `main` function,
prompts through `main` itself in chunks of COREAI_CHUNK_THRESHOLD, logits buffer sized for 256 rows.
`pipelined_rules` are the engine's binding rules, unchanged in the later pull requests as far as their
threads show; apple_main reuses them.
"""

from __future__ import annotations

from ..format import PREFILL_FUNCTION
from .base import (
    FAIL,
    KV_CACHE,
    LLM_RUNNER,
    LOGITS_BUFFER,
    MODEL_CONFIG,
    PASS,
    PIPELINED,
    STATE_FACTORY,
    STRUCTURE,
    WARN,
    Add,
    Signature,
    Subject,
    at_86b,
    classify_states,
    kv_layout,
    verdict,
)


def engine_choice(subject: Subject, add: Add) -> None:
    """The `extend` prefix: `extend*` functions with `load_embeddings` make the asset chunked-static
    (the Neural Engine engine); otherwise a `main` makes it dynamic (the pipelined GPU engine)."""
    functions = list(subject.functions or {})
    static = any(n.startswith("extend") for n in functions) and "load_embeddings" in functions
    add("engine choice", verdict(subject.main is not None and not static),
        f"functions {functions}: none named extend* beside load_embeddings, and a main -> 'dynamic' -> "
        "coreai-pipelined", at_86b(STRUCTURE, "244-245"))


def pipelined_rules(subject: Subject, add: Add) -> Signature | None:
    """Inputs, logits and states as the pipelined engine binds them; returns `main`."""
    main = subject.main
    add("main function", verdict(main is not None), f"function_map.main (default main) in {list(subject.functions or {})}",
        at_86b(PIPELINED, "593-596"))
    if main is None:
        return None
    names = main.names("inputs")
    add("two inputs", verdict(len(names) == 2), f"{names}: the engine binds exactly 2, by position (ids, "
        "positions)", at_86b(PIPELINED, "599-602"))
    if len(main.inputs) >= 2:
        ids, pos = main.inputs[0][1], main.inputs[1][1]
        add("inputs[0] token ids", verdict(ids is not None and ids.dtype == "Int32" and len(ids.shape) == 2),
            f"{names[0]} {ids or '?'}: int32 [1, q]", at_86b(PIPELINED, "636, 885-900"))
        add("inputs[1] position ramp", verdict(pos is not None and pos.dtype == "Int32" and pos.shape[1:] == [-1]),
            f"{names[1]} {pos or '?'}: int32 [1, processed + q], dynamic", at_86b(PIPELINED, "637, 894-896"))
    outputs = main.outputs
    logits = outputs[0][1] if outputs else None
    add("outputs[0] fp16 logits", verdict(logits is not None and logits.dtype == "Float16"),
        f"{outputs[0][0] if outputs else 'none'} {logits or ''}: the sampler reads the first output, fp16 only",
        at_86b(PIPELINED, "603-606, 655-662"))
    states = main.states
    add("2-4 states", verdict(2 <= len(states) <= 4), f"{len(states)}: {main.names('states')}",
        at_86b(PIPELINED, "607-611"))
    kinds = classify_states(states)
    growing = [n for n, k in kinds.items() if k == "kv_cache"]
    described = ", ".join(f"{n}={k}" for n, k in kinds.items())
    add("state kinds", verdict(len(growing) >= 2), f"{described}: at least 2 growing (dynamic-dim) states; a static "
        "one named *cache*/*kv* is a sliding window", at_86b(STATE_FACTORY, "53-55, 88-100") + "; " +
        at_86b(PIPELINED, "613-622"))
    add("state order", verdict(growing[:2] == main.names("states")[:2] or len(growing) < 2, WARN),
        f"declared {main.names('states')}: the KV pair is the first two growing states in declaration order, "
        "wherever they sit (order-free)", at_86b(PIPELINED, "617-625"))
    kv_layout(add, states, growing[:2], at_86b(KV_CACHE, "95-105"), at_86b(KV_CACHE, "228-267, 464"))
    return main


def check(subject: Subject, add: Add) -> None:
    engine_choice(subject, add)
    main = pipelined_rules(subject, add)
    if main is None:
        return
    ids = main.inputs[0][1] if main.inputs else None
    logits = main.outputs[0][1] if main.outputs else None
    if logits is not None:
        add("logits query length", verdict(logits.shape[1:2] == [-1]), f"{logits}: the logits buffer starts at 256 "
            "rows, resolved against the output's shape, so a static [1, 1, V] output fails at engine creation "
            "(apple/coreai-models#212, fixed on main by #227)", at_86b(LOGITS_BUFFER, "58-59") + "; " +
            at_86b(PIPELINED, "745-752"))
    if ids is not None and ids.shape[1:] != [-1]:
        add("prompt chunks", WARN, f"input_ids is static {ids.shape}: prompts go through main in chunks of "
            "COREAI_CHUNK_THRESHOLD (default 1024, one pass below it); run with COREAI_CHUNK_THRESHOLD=1",
            at_86b(MODEL_CONFIG, "128-143") + "; " + at_86b(PIPELINED, "1153-1168"))
        add("warm-up", WARN, "llm-runner's default warm-up runs main at [1, 256], which a static [1, 1] graph "
            "rejects: use --warmup exact --warmup-length 1 (or a one-token generate)",
            at_86b(LLM_RUNNER, "1289-1291") + "; " + at_86b(PIPELINED, "1654-1664"))
    if PREFILL_FUNCTION in (subject.functions or {}):
        add(f"{PREFILL_FUNCTION} function", PASS, "not read at 86b363d (the engine loads function_map.main only): "
            "harmless", at_86b(PIPELINED, "754-758"))
    vision_layout(subject, add, at_86b(SWIFT_VLM, "46-52") + "; " + at_86b(SEQUENTIAL_VLM, "228-237"))


SWIFT_VLM = "CoreAILanguageModels/VLM/CoreAIVisionLanguageModel.swift"
SEQUENTIAL_VLM = "CoreAILanguageModels/InferenceEngines/CoreAISequentialVLMEngine.swift"


def vision_layout(subject: Subject, add: Add, source: str) -> None:
    """An image-text bundle against Apple's VLM path: it needs `kind: vlm` with `vision` and `embedding`
    assets and a decoder of exactly 2 inputs (embeddings, positions) and 2 states. Qwen3-VL's decoder
    needs more than that layout can carry (the DeepStack rows added after its first layers and the
    M-RoPE (t, h, w) positions), so lmbundle follows the zoo's contract instead; this says what is missing."""
    if "vision" not in subject.meta:
        return
    assets = subject.assets
    missing = [f"assets.{k}" for k in ("vision", "embedding") if k not in assets]
    if subject.meta.get("kind") != "vlm":
        missing.insert(0, "kind vlm")
    main = subject.main
    if main is not None and len(main.inputs) != 2:
        missing.append(f"a decoder of 2 inputs (embeddings, positions), not {main.names('inputs')}")
    if main is not None and len(main.states) != 2:
        missing.append(f"exactly 2 states, not {len(main.states)}")
    deepstack = subject.meta["vision"].get("num_deepstack") if isinstance(subject.meta["vision"], dict) else 0
    if deepstack:
        missing.append(f"a way to feed {deepstack} DeepStack levels and M-RoPE positions (that layout has none)")
    add("Apple's VLM engine layout", PASS if not missing else FAIL, "missing: " + "; ".join(missing) if missing
        else "kind vlm, vision + embedding assets, a 2-input 2-state decoder", source)
