"""Apple's engines on main, after the 86b363d snapshot, as the merged pull requests and Apple's later
sources define them:
- #204 "distinct prompt function" (later renamed: `prefillGraphFunctionName = "prefill"`, Python
  `PREFILL_GRAPH_NAME`): an optional entry point looked up by that fixed name, which must take `main`'s
  input names in order and its set of states, and declare no outputs. With it every prompt is chunked:
  all but the last token through it in balanced chunks of at most the chunk size, the last through `main`.
- #240: `language.prefill_chunk_size` / `prefill_chunk_threshold` in metadata.json (CLI > Foundation
  Models API > metadata > the deprecated COREAI_CHUNK_THRESHOLD > a 2048/4096 memory default).
- #227: a static [1, 1, V] logits output is accepted (fixes #212).
- #249/#251: `kind: vlm` routes to the sequential VLM engine (vision + embedding assets, a decoder of
  2 inputs and exactly 2 states).
The binding rules of the pipelined engine are 86b363d's (`apple_86b363d.pipelined_rules`).
"""

from __future__ import annotations

from ..format import PREFILL_FUNCTION
from .apple_86b363d import engine_choice, pipelined_rules, vision_layout
from .base import PASS, Add, Subject, verdict

PROMPT_FUNCTION = f"#204 (prompt function; Apple main's prefillGraphFunctionName = {PREFILL_FUNCTION!r})"
CHUNKS = "#240 (LanguageConfig prefill_chunk_size / prefill_chunk_threshold)"


def check(subject: Subject, add: Add) -> None:
    engine_choice(subject, add)
    main = pipelined_rules(subject, add)
    if main is None:
        return
    logits = main.outputs[0][1] if main.outputs else None
    if logits is not None:
        add("logits query length", PASS, f"{logits}: static [1, 1, V] logits are accepted since #227",
            "#227 (fixes #212)")
    vision_layout(subject, add, "#249/#251 (EngineFactory.makeVLMEngine, CoreAISequentialVLMEngine)")
    prefill = (subject.functions or {}).get(PREFILL_FUNCTION)
    ids = main.inputs[0][1] if main.inputs else None
    static_ids = ids is not None and ids.shape[1:] != [-1]
    language = subject.language
    chunk = language.get("prefill_chunk_size")
    if prefill is None:
        add(f"{PREFILL_FUNCTION} function", verdict(not static_ids or chunk == 1),
            f"none: prompts go through main in chunks of prefill_chunk_size ({chunk!r}); a static {ids} main "
            "needs 1", PROMPT_FUNCTION + "; " + CHUNKS)
        return
    same_inputs = prefill.names("inputs") == main.names("inputs")
    same_states = set(prefill.names("states")) == set(main.names("states"))
    add(f"{PREFILL_FUNCTION} function", verdict(same_inputs and same_states and not prefill.outputs),
        f"inputs {prefill.names('inputs')}, states {prefill.names('states')}, outputs {prefill.names('outputs')}: "
        "main's input names in order, its set of states, no outputs", PROMPT_FUNCTION)
    query = prefill.inputs[0][1] if prefill.inputs else None
    add(f"{PREFILL_FUNCTION} query length", verdict(query is not None and query.shape[1:] == [-1]),
        f"{query}: the balanced chunks vary in length, so input_ids must be [1, -1]", PROMPT_FUNCTION)
    ok = isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0
    add("prefill_chunk_size", verdict(ok), f"{chunk!r}: what one {PREFILL_FUNCTION} call may take; absent, the "
        "engine's default (2048 or 4096) would exceed it", CHUNKS)
    threshold = language.get("prefill_chunk_threshold")
    add("prefill_chunk_threshold", verdict(threshold is None or (isinstance(threshold, int) and threshold > 0)),
        f"{threshold!r}: ignored while the prefill function is present (every prompt is chunked)", CHUNKS)
