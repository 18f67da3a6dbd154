"""What every host's rules read and how they report: the bundle as the checks see it (`Subject`), the
asset's signatures, the verdicts, and where a rule comes from.

A rule's source names the file and lines of apple/coreai-models at the 86b363d snapshot, the merged pull
request a later rule comes from, or the zoo's documents (its engine patch and the seed model cards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"
AT_86B = "apple@86b363d "  # file paths below are under swift/Sources/ of apple/coreai-models
MODEL_BUNDLE = "CoreAIShared/Bundle/ModelBundle.swift"
BUNDLE_KIND = "CoreAIShared/Bundle/BundleKind.swift"
STRUCTURE = "CoreAIShared/Runtime/ModelStructure.swift"
LANGUAGE_BUNDLE = "CoreAILanguageModels/Bundle/LanguageBundle.swift"
LANGUAGE_CONFIG = "CoreAILanguageModels/Bundle/LanguageConfig.swift"
STATE_FACTORY = "CoreAILanguageModels/Handlers/StateHandlerFactory.swift"
PIPELINED = "CoreAILanguageModels/InferenceEngines/CoreAIPipelinedEngine.swift"
KV_CACHE = "CoreAILanguageModels/InferenceEngines/KVCache+CoreAI.swift"
LOGITS_BUFFER = "CoreAILanguageModels/InferenceEngines/TensorStorage+CoreAI.swift"
MODEL_CONFIG = "CoreAILanguageModels/InferenceEngines/ModelConfig.swift"
LLM_RUNNER = "Tools/llm-runner/LLMRunnerMain.swift"
ZOO_PATCH = "zoo apps/coreai-pipelined-extra-states.patch"
ZOO_VLM_CARD = "zoo Qwen3-VL model card (shared/seeds)"
ZOO_CARD = "zoo Qwen3.5 model card (shared/seeds)"
KV_DTYPES = ("Float16", "BFloat16", "Float32")  # what the engine's MPS copy of a growing KV can hold


def at_86b(path: str, lines: str) -> str:
    return f"{AT_86B}{path}:{lines}"


@dataclass
class Tensor:
    dtype: str  # Int32, Float16, Float32, ...
    shape: list[int]  # -1 for a dynamic dim

    @property
    def dynamic(self) -> bool:
        return -1 in self.shape

    def __str__(self) -> str:
        return f"{self.dtype} {self.shape}"


@dataclass
class Signature:
    inputs: list[tuple[str, Tensor | None]]
    outputs: list[tuple[str, Tensor | None]]
    states: list[tuple[str, Tensor | None]]

    def names(self, part: str) -> list[str]:
        return [name for name, _ in getattr(self, part)]


@dataclass
class Subject:
    """A bundle as the rules read it: metadata.json, and the functions of its `.aimodel` assets."""

    folder: Path
    meta: dict[str, Any]
    target: str  # macos | ios
    functions: dict[str, Signature] | None = None  # assets.main's, None when unreadable or absent
    vision_functions: dict[str, Signature] | None = None  # the vision encoder asset's

    @property
    def language(self) -> dict[str, Any]:
        language = self.meta.get("language")
        return language if isinstance(language, dict) else {}

    @property
    def assets(self) -> dict[str, Any]:
        assets = self.meta.get("assets")
        return assets if isinstance(assets, dict) else {}

    @property
    def main(self) -> Signature | None:
        function_map = self.language.get("function_map")
        names = function_map.get("main") if isinstance(function_map, dict) else None
        name = names[0] if isinstance(names, list) and names else "main"
        return (self.functions or {}).get(name)

    @property
    def lmbundle(self) -> dict[str, Any]:
        info = self.meta.get("lmbundle")
        return info if isinstance(info, dict) else {}


Add = Callable[[str, str, str, str], None]  # add(rule name, status, detail, source)


def verdict(ok: bool, otherwise: str = FAIL) -> str:
    return PASS if ok else otherwise


def classify_states(states: list[tuple[str, Tensor | None]]) -> dict[str, str]:
    """Apple's state heuristic (the pipelined engine passes no metadata kinds): exactly two states are
    both KV; else a state with a dynamic dim is KV, a static one named *cache* or *kv* is a sliding
    window, the rest are fixed."""
    if len(states) == 2:
        return {name: "kv_cache" for name, _ in states}
    kinds = {}
    for name, tensor in states:
        if tensor is not None and tensor.dynamic:
            kinds[name] = "kv_cache"
        elif "cache" in name.lower() or "kv" in name.lower():
            kinds[name] = "sliding_cache"
        else:
            kinds[name] = "fixed"
    return kinds


def kv_layout(add: Add, states: list[tuple[str, Tensor | None]], pair: list[str], source_seq: str,
              source_dtype: str) -> None:
    """The KV pair's layout the engine grows: rank 5 [L, B, H, S, D] with S (dim 3) dynamic, K and V
    alike, a dtype the engine's growth copy takes."""
    shapes = dict(states)
    for name in pair:
        tensor = shapes.get(name)
        ok = tensor is not None and len(tensor.shape) == 5 and tensor.shape[3] == -1 and tensor.shape.count(-1) == 1
        add(f"{name} layout", verdict(ok), f"{tensor or '?'}: rank 5 [layers, 1, kv_heads, seq, head_dim], only the "
            "sequence (dim 3) dynamic: the engine grows dim 3 of a rank-5 cache (dim 2 of rank 4)", source_seq)
    if len(pair) == 2 and all(shapes.get(n) is not None for n in pair):
        key, value = shapes[pair[0]], shapes[pair[1]]
        ok = key.shape == value.shape and key.dtype == value.dtype and key.dtype in KV_DTYPES
        add("KV dtype", verdict(ok), f"{pair[0]} {key}, {pair[1]} {value}: alike, one of {', '.join(KV_DTYPES)}",
            source_dtype)
