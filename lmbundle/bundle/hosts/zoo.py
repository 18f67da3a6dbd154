"""The zoo's engine, the seeds' run path: Apple's pipelined engine with the zoo's extra-states patch
(`apps/coreai-pipelined-extra-states.patch`) and its static-inputs patch for the VLM decoder, driven as
the seed model cards run it: COREAI_CHUNK_THRESHOLD=1 (the prompt as S=1 steps through `main`), a warm-up
of one real token, the logits-shape guard of #212. It binds the KV pair by position (states 0 and 1) and
refuses extra states with dynamic dims.
"""

from __future__ import annotations

from ..format import IMAGE_INPUT_NAMES, STATE_NAMES
from .base import (
    FAIL,
    WARN,
    ZOO_CARD,
    ZOO_PATCH,
    ZOO_VLM_CARD,
    Add,
    Subject,
    kv_layout,
    verdict,
)

KV_PAIR = [STATE_NAMES["key"], STATE_NAMES["value"]]
ENGINE_MESSAGE = "Extra state '{}' has dynamic dims"  # the patched engine's own error
IMAGE_DTYPES = {"image_embeds": "Float16", "deepstack_embeds": "Float16", "rope_shift_start": "Int32",
                "rope_shift_amount": "Int32"}


def check(subject: Subject, add: Add) -> None:
    main = subject.main
    add("main function", verdict(main is not None), f"function_map.main in {list(subject.functions or {})}", ZOO_CARD)
    if main is None:
        return
    states = main.states
    names = main.names("states")
    kv = names[:2]
    shapes = dict(states)
    ok = len(kv) == 2 and all(shapes[n] is not None and shapes[n].dynamic for n in kv)
    add("state order", verdict(ok), f"declared {names}: states 0 and 1 are bound as the KV pair ({' and '.join(KV_PAIR)} "
        "here), by position", ZOO_PATCH)
    extra = [n for n in names[2:] if shapes[n] is None or shapes[n].dynamic]
    add("extra states static", verdict(not extra), "; ".join(ENGINE_MESSAGE.format(n) for n in extra) if extra
        else f"{names[2:] or 'none'}: fixed size, zeroed on reset", ZOO_PATCH)
    kv_layout(add, states, kv, ZOO_PATCH + " (Apple's growth of dim 3)", ZOO_PATCH)
    inputs = dict(main.inputs)
    ids, pos = main.inputs[0][1] if main.inputs else None, inputs.get("position_ids")
    add("input_ids", verdict(ids is not None and ids.dtype == "Int32" and ids.shape == [1, 1]),
        f"{ids}: the S=1 step ([1, 1] int32); the prompt runs as S=1 steps (COREAI_CHUNK_THRESHOLD=1)", ZOO_CARD)
    add("position_ids", verdict(pos is not None and pos.dtype == "Int32" and pos.shape[1:] == [-1]),
        f"{pos}: the ramp [1, t + 1] int32", ZOO_CARD)
    logits = main.outputs[0][1] if main.outputs else None
    add("outputs[0] fp16 logits", verdict(logits is not None and logits.dtype == "Float16"), f"{logits}: [1, 1, V] "
        "fp16 (the patched engine guards #212's static logits)", ZOO_CARD)
    if subject.lmbundle.get("quant", {}).get("head", "").endswith("perchan"):
        add("head quant", WARN, "int8 per-channel head: the zoo documents per-channel int8 as garbage on the GPU "
            "delegate; its ship head is per-block-32 absmax (--head-quant block32)", ZOO_CARD)
    if "vision" in subject.meta:
        _image_inputs(subject, add)


def _image_inputs(subject: Subject, add: Add) -> None:
    """The seed's Qwen3-VL contract: a `kind: llm` decoder whose 4 static image inputs are fp16 for one
    image on the encoder's fixed grid, fed once per image; the encoder its own fp16 asset."""
    vision, main = subject.meta["vision"], subject.main
    add("kind llm", verdict(subject.meta.get("kind") == "llm"), f"{subject.meta.get('kind')!r}: the decoder is a "
        "LanguageBundle; the host runs the encoder itself", ZOO_VLM_CARD)
    tokens, levels = vision.get("tokens_per_image"), vision.get("num_deepstack", 0)
    hidden = vision.get("out_hidden_size")
    want = {"image_embeds": [tokens, hidden], "deepstack_embeds": [levels * tokens if tokens else None, hidden],
            "rope_shift_start": [1], "rope_shift_amount": [1]}
    inputs = dict(main.inputs)
    for name in IMAGE_INPUT_NAMES:
        tensor = inputs.get(name)
        ok = tensor is not None and tensor.dtype == IMAGE_DTYPES[name] and tensor.shape == want[name]
        add(f"input {name}", verdict(ok), f"{tensor}: {IMAGE_DTYPES[name]} {want[name]} (one image of {tokens} "
            "tokens)", ZOO_VLM_CARD)
    functions = subject.vision_functions
    encoder = (functions or {}).get("main")
    if encoder is None:
        add("vision encoder asset", FAIL, f"{subject.assets.get('vision')!r}: the encoder's own asset with a main "
            "function", ZOO_VLM_CARD)
        return
    dtypes = {t.dtype for _, t in encoder.inputs + encoder.outputs if t is not None}
    add("vision encoder asset", verdict(dtypes == {"Float16"}), f"patches {encoder.inputs[0][1]} -> "
        f"{', '.join(str(t) for _, t in encoder.outputs)}: fp16 in and out, one image on the fixed grid",
        ZOO_VLM_CARD)
