"""`lmbundle info --check`: does a bundle satisfy the rules of Apple's bundle loader and pipelined engine?

Each rule below was read from Apple's apple/coreai-models sources (snapshot 86b363d) and is written here
in our own words; `source` names the file a rule comes from. A rule ends as
- PASS: Apple's code would accept this part of the bundle;
- FAIL: Apple's code would reject it (or load it wrongly);
- DIFFERS: our bundle departs from the stock engine on purpose, and the detail says why that is allowed
  (these do not fail the check).
The asset's function signatures are read with coreai-core's `AIModelAsset.summary` (no compile), the
same call Apple's loader uses to probe an asset's structure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LmbundleError
from .format import IMAGE_INPUT_NAMES

PASS, FAIL, DIFFERS = "PASS", "FAIL", "DIFFERS"
APPLE = "apple/coreai-models"
MODEL_BUNDLE = "swift/Sources/CoreAIShared/Bundle/ModelBundle.swift"
BUNDLE_KIND = "swift/Sources/CoreAIShared/Bundle/BundleKind.swift"
LANGUAGE_BUNDLE = "swift/Sources/CoreAILanguageModels/Bundle/LanguageBundle.swift"
LANGUAGE_CONFIG = "swift/Sources/CoreAILanguageModels/Bundle/LanguageConfig.swift"
FUNCTION_MAP = "swift/Sources/CoreAIShared/Bundle/FunctionMap.swift"
STATE_FACTORY = "swift/Sources/CoreAILanguageModels/Handlers/StateHandlerFactory.swift"
STRUCTURE = "swift/Sources/CoreAIShared/Runtime/ModelStructure.swift"
PIPELINED = "swift/Sources/CoreAILanguageModels/InferenceEngines/CoreAIPipelinedEngine.swift"
KV_CACHE = "swift/Sources/CoreAILanguageModels/InferenceEngines/KVCache+CoreAI.swift"
MODEL_CONFIG = "swift/Sources/CoreAILanguageModels/InferenceEngines/ModelConfig.swift"
RUNNER = "swift/Sources/CoreAILanguageModels/LanguageModel/CoreAIRunner.swift"
VLM = "swift/Sources/CoreAILanguageModels/VLM/CoreAIVisionLanguageModel.swift"
EXPORT_BUNDLE = "python/src/coreai_models/export/bundle.py"

BUNDLE_KINDS = ("llm", "vlm", "diffusion", "segmenter", "speech_recognizer")
STATE_KINDS = ("kv_cache", "sliding_cache", "fixed")
IMAGE_STRATEGIES = ("stretch", "center_crop", "pad")


@dataclass
class Rule:
    name: str
    status: str
    detail: str
    source: str

    def line(self) -> str:
        return f"  {self.status:<7} {self.name}: {self.detail}  [{self.source}]"


@dataclass
class CheckReport:
    bundle: Path
    rules: list[Rule] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(rule.status != FAIL for rule in self.rules)

    @property
    def failures(self) -> list[Rule]:
        return [rule for rule in self.rules if rule.status == FAIL]

    def add(self, name: str, ok: bool, detail: str, source: str, differs: str | None = None) -> None:
        """A rule: PASS if ok, else DIFFERS when `differs` explains why the departure is allowed, else FAIL."""
        status = PASS if ok else DIFFERS if differs else FAIL
        self.rules.append(Rule(name, status, detail + (f" (allowed: {differs})" if not ok and differs else ""),
                               source))

    def lines(self) -> list[str]:
        head = f"{self.bundle}: Apple Core AI bundle check ({APPLE} @ 86b363d)"
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures)} rule(s): " + \
            ", ".join(rule.name for rule in self.failures) + ")"
        return [head, *(rule.line() for rule in self.rules), f"  verdict: {verdict}"]

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle), "passed": self.passed,
                "rules": [rule.__dict__ for rule in self.rules]}


@dataclass
class Tensor:
    dtype: str  # Int32, Float16, Float32, ...
    shape: list[int]  # -1 for a dynamic dim


def _parse_type(text: str) -> Tensor | None:
    """'NDArray (Float32, 1 × 1 × 2 × ? × 32)' -> Tensor('Float32', [1, 1, 2, -1, 32])."""
    match = re.fullmatch(r"NDArray \((\w+), (.*)\)", text.strip())
    if not match:
        return None
    dims = [-1 if d.strip() == "?" else int(d) for d in match.group(2).split("×")] if match.group(2).strip() else []
    return Tensor(match.group(1), dims)


@dataclass
class Signature:
    inputs: list[tuple[str, Tensor | None]]
    outputs: list[tuple[str, Tensor | None]]
    states: list[tuple[str, Tensor | None]]


def read_signatures(aimodel: Path) -> dict[str, Signature]:
    """The functions of a `.aimodel` and their inputs/outputs/states, in declaration order."""
    try:
        from coreai.authoring.asset import AIModelAsset
    except ImportError as exc:
        raise LmbundleError("--check reads the asset with coreai-core: pip install 'lmbundle[coreai]'") from exc
    try:
        summary = AIModelAsset.load(aimodel).summary(include_statistics=False)
    except Exception as exc:  # the runtime raises plain RuntimeErrors on unreadable assets
        raise LmbundleError(f"{aimodel}: Core AI cannot read the asset ({str(exc).splitlines()[0][:200]})") from None
    if summary is None:
        raise LmbundleError(f"{aimodel}: the asset has no bytecode")
    parse = lambda pairs: [(name, _parse_type(text)) for name, text in pairs]  # noqa: E731
    return {name: Signature(parse(summary.function_inputs(name)), parse(summary.function_outputs(name)),
                            parse(summary.function_states(name)))
            for name in summary.function_names}


def _is_str_map(value, item=str) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, item) for k, v in value.items())


def _asset_exists(folder: Path, path: str) -> bool:
    """An asset path resolves to the file, or for `.aimodel` to its compiled `.aimodelc` sibling."""
    return (folder / path).exists() or (path.endswith(".aimodel") and (folder / (path + "c")).exists())


def check_bundle(folder: str | Path) -> CheckReport:
    """Apply Apple's rules to the bundle at `folder`."""
    folder = Path(folder).expanduser()
    report = CheckReport(folder)
    meta_path = folder / "metadata.json"
    if folder.suffix in (".aimodel", ".aimodelc"):
        report.add("bundle folder", False, "this is a model asset, not a bundle folder", MODEL_BUNDLE)
        return report
    if not meta_path.is_file():
        report.add("metadata.json", False, "no metadata.json in the folder", MODEL_BUNDLE)
        return report
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        report.add("metadata.json", False, f"not valid JSON ({exc})", MODEL_BUNDLE)
        return report
    if not isinstance(meta, dict):
        report.add("metadata.json", False, "not a JSON object", MODEL_BUNDLE)
        return report
    _check_common(report, folder, meta)
    language = meta.get("language") if isinstance(meta.get("language"), dict) else None
    _check_language(report, folder, meta, language)
    main = meta.get("assets", {}).get("main") if isinstance(meta.get("assets"), dict) else None
    if isinstance(main, str) and (folder / main).is_dir() and language is not None:
        _check_asset(report, folder / main, meta, language)
    return report


def _check_common(report: CheckReport, folder: Path, meta: dict) -> None:
    version = meta.get("metadata_version", None)
    report.add("metadata_version", version == "0.2",
               f"is {version!r}; the loader knows only \"0.2\" (a missing one reads as \"0.1\")", MODEL_BUNDLE)
    kind = meta.get("kind")
    report.add("kind", kind in BUNDLE_KINDS, f"is {kind!r}; BundleKind is one of {', '.join(BUNDLE_KINDS)}",
               BUNDLE_KIND)
    report.add("kind is a language bundle", kind in ("llm", "vlm"),
               f"is {kind!r}; LanguageBundle takes llm or vlm", LANGUAGE_BUNDLE)
    report.add("name", isinstance(meta.get("name"), str) and bool(meta.get("name")),
               f"{meta.get('name')!r} (a non-empty string)", MODEL_BUNDLE)
    assets = meta.get("assets")
    report.add("assets", assets is None or _is_str_map(assets), "a map of component name -> path", MODEL_BUNDLE)
    if _is_str_map(assets):
        report.add("assets.main", "main" in assets, f"{assets.get('main')!r} (LanguageBundle requires it)",
                   LANGUAGE_BUNDLE)
        for key, path in sorted(assets.items()):
            report.add(f"assets.{key} exists", _asset_exists(folder, path),
                       f"{path} (or its compiled {path}c) in the bundle folder", MODEL_BUNDLE)
    user_data = meta.get("user_data")
    if user_data is not None:
        report.add("user_data", _is_str_map(user_data), "a map of strings to strings", MODEL_BUNDLE)


def _check_language(report: CheckReport, folder: Path, meta: dict, language: dict | None) -> None:
    report.add("language", language is not None, "the language section (LanguageBundle requires it)",
               LANGUAGE_BUNDLE)
    if language is None:
        return
    for key, kind in (("tokenizer", str), ("vocab_size", int), ("max_context_length", int)):
        value = language.get(key)
        ok = isinstance(value, kind) and not isinstance(value, bool) and (kind is str or value > 0)
        report.add(f"language.{key}", ok, f"{value!r} ({'a string' if kind is str else 'a positive integer'})",
                   LANGUAGE_CONFIG if key == "tokenizer" else MODEL_CONFIG)
    embedded = language.get("embedded_tokenizer", True)
    if embedded:
        report.add("tokenizer/tokenizer.json", (folder / "tokenizer" / "tokenizer.json").is_file(),
                   "embedded_tokenizer (default true) loads tokenizer/tokenizer.json; without it the loader "
                   "fetches language.tokenizer from the Hub", LANGUAGE_BUNDLE)
    function_map = language.get("function_map")
    if function_map is not None:
        ok = isinstance(function_map, dict) and all(
            isinstance(v, list) and v and all(isinstance(n, str) for n in v) for v in function_map.values())
        report.add("language.function_map", ok, "role -> non-empty list of function names", FUNCTION_MAP)
    states = language.get("states")
    if states is not None:
        report.add("language.states", _is_str_map(states) and all(v in STATE_KINDS for v in states.values()),
                   f"state name -> one of {', '.join(STATE_KINDS)}", LANGUAGE_CONFIG)
    else:
        report.add("language.states", False, "absent: the engine classifies states by name and shape only",
                   LANGUAGE_CONFIG, differs="optional; the rules below check that the heuristic gets them right")
    if meta.get("kind") == "vlm":
        vision = meta.get("vision")
        needed = {"image_size": int, "patch_size": int, "image_token_count": int, "image_token_id": int}
        ok = isinstance(vision, dict) and all(isinstance(vision.get(k), t) for k, t in needed.items())
        report.add("vision (kind vlm)", ok, "a vision section with image_size, patch_size, image_token_count, "
                   "image_token_id", LANGUAGE_BUNDLE)
        if isinstance(vision, dict):
            number = (int, float)
            typed = all(isinstance(vision.get(k), list) and len(vision[k]) == 3
                        and all(isinstance(v, number) for v in vision[k])
                        for k in ("image_mean", "image_std") if k in vision)
            typed &= isinstance(vision.get("rescale_factor", 1.0), number)
            typed &= isinstance(vision.get("include_image_info", False), bool)
            report.add("vision optional keys", typed, "image_mean/image_std 3 numbers, rescale_factor a number, "
                       "include_image_info a bool where present (a wrong type fails the JSON decode)",
                       LANGUAGE_CONFIG)
            strategy = vision.get("image_strategy", "stretch")
            report.add("vision.image_strategy", strategy in IMAGE_STRATEGIES,
                       f"{strategy!r} (one of {', '.join(IMAGE_STRATEGIES)})", LANGUAGE_CONFIG)
            assets = meta.get("assets") if isinstance(meta.get("assets"), dict) else {}
            report.add("Apple's VLM runner", "embedding" in assets and "vision" in assets,
                       "CoreAIVisionLanguageModel needs assets.vision and assets.embedding (an embedding model "
                       "feeding a decoder that takes embeddings)", VLM,
                       differs="our VLM decoder follows the zoo's id-space contract: image rows ride 4 static "
                       "inputs of the text decoder, which the zoo's static-inputs engine patch feeds")


def _classify(states: list[tuple[str, Tensor | None]]) -> dict[str, str]:
    """Apple's heuristic (the pipelined engine passes no metadata kinds): exactly two states are both
    KV; else a state with a dynamic dim is KV, a static one named *cache* or *kv* is sliding, the rest fixed."""
    if len(states) == 2:
        return {name: "kv_cache" for name, _ in states}
    kinds = {}
    for name, tensor in states:
        if tensor is not None and -1 in tensor.shape:
            kinds[name] = "kv_cache"
        elif "cache" in name.lower() or "kv" in name.lower():
            kinds[name] = "sliding_cache"
        else:
            kinds[name] = "fixed"
    return kinds


def _check_asset(report: CheckReport, aimodel: Path, meta: dict, language: dict) -> None:
    functions = read_signatures(aimodel)
    function_map = language.get("function_map") if isinstance(language.get("function_map"), dict) else {}
    main_name = (function_map.get("main") or ["main"])[0]
    report.add("main function", main_name in functions,
               f"function_map.main -> {main_name!r}; the asset has {', '.join(functions) or 'none'}", RUNNER)
    for role, names in sorted(function_map.items()):
        missing = [n for n in names if n not in functions] if isinstance(names, list) else names
        report.add(f"function_map.{role} in the asset", not missing,
                   f"{names} ({'missing: ' + ', '.join(missing) if missing else 'all present'})", FUNCTION_MAP)
    static = any(n.startswith("extend_") for n in functions) and "load_embeddings" in functions
    report.add("engine choice", "main" in functions and not static,
               "a `main` function and no extend_* + load_embeddings set: structure 'dynamic' -> the "
               "coreai-pipelined GPU engine", STRUCTURE)
    signature = functions.get(main_name)
    if signature is None:
        return
    _check_pipelined(report, signature, meta, language)
    extra = [n for n in functions if n != main_name]
    for name in extra:
        other = functions[name]
        same = [s for s, _ in other.states] == [s for s, _ in signature.states]
        report.add(f"{name} function", same,
                   f"takes the same states as {main_name} ({', '.join(s for s, _ in other.states)})", PIPELINED,
                   differs=None)
    if extra:
        report.add("prefill entry point", False,
                   f"{', '.join(extra)} beside main; the stock pipelined engine loads only function_map.main and "
                   "prefills with it", PIPELINED,
                   differs="an extra function is ignored by the engine (Apple's own Qwen3.5 export adds `prefill` "
                   "the same way); lmbundle's Core AI backend prefills with it")


def _check_pipelined(report: CheckReport, sig: Signature, meta: dict, language: dict) -> None:
    inputs, outputs, states = sig.inputs, sig.outputs, sig.states
    names = [n for n, _ in inputs]
    image = [n for n in names[2:] if n in IMAGE_INPUT_NAMES]
    report.add("two inputs", len(inputs) == 2, f"{names}; the engine binds exactly 2 (input_ids, position_ids)",
               PIPELINED, differs="the 4 extra inputs are the VLM image rows (zoo static-inputs patch)"
               if image and len(inputs) == 2 + len(image) else None)
    if len(inputs) >= 2:
        ids, pos = inputs[0][1], inputs[1][1]
        report.add("inputs[0] is the token ids", inputs[0][0] == "input_ids" and ids is not None
                   and ids.dtype == "Int32" and len(ids.shape) == 2 and ids.shape[0] == 1,
                   f"{inputs[0][0]} {ids.dtype if ids else '?'} {ids.shape if ids else '?'}: [1, q] int32, bound "
                   "by position in the input list", PIPELINED)
        report.add("inputs[1] is the position ramp", inputs[1][0] == "position_ids" and pos is not None
                   and pos.dtype == "Int32" and pos.shape[:1] == [1] and pos.shape[1:] == [-1],
                   f"{inputs[1][0]} {pos.dtype if pos else '?'} {pos.shape if pos else '?'}: int32 [1, processed + q] "
                   "(dynamic)", PIPELINED)
        if ids is not None and ids.shape[1:] != [-1]:
            report.add("query length", False, f"input_ids is static {ids.shape}: the engine feeds [1, q] with q = "
                       "the prompt chunk", PIPELINED,
                       differs="the seed's loop-free S=1 graph: run the engine with COREAI_CHUNK_THRESHOLD=1 so it "
                       "prefills as S=1 steps, and warm up with one real token (never engine.warmup())")
    report.add("outputs", len(outputs) >= 1, f"{[n for n, _ in outputs]} (at least one)", PIPELINED)
    if outputs:
        name, logits = outputs[0]
        vocab = language.get("vocab_size")
        report.add("outputs[0] is fp16 logits", logits is not None and logits.dtype == "Float16",
                   f"{name} {logits.dtype if logits else '?'}: the engine samples from the first output and "
                   "accepts only float16", PIPELINED)
        report.add("logits shape", logits is not None and len(logits.shape) == 3 and logits.shape[-1] == vocab,
                   f"{logits.shape if logits else '?'}: [1, q, vocab_size={vocab}]", PIPELINED)
        if logits is not None and logits.shape[1:2] == [1]:
            report.add("logits query length", False, "static [1, 1, V] logits", PIPELINED,
                       differs="stock engines before the fix of apple/coreai-models#212 size the prefill logits "
                       "buffer for 256 tokens and reject a static [1, 1] output at creation; the zoo's engine "
                       "guards it. Decode reads one row either way")
        if len(outputs) > 1:
            report.add("extra outputs", False, f"{[n for n, _ in outputs[1:]]} after the logits", PIPELINED,
                       differs="the engine reads outputs[0] only; next_token (the in-graph argmax) lets lmbundle "
                       "feed step n+1 without reading logits")
    report.add("2-4 states", 2 <= len(states) <= 4, f"{len(states)}: {[n for n, _ in states]}", PIPELINED)
    kinds = _classify(states)
    growing = [n for n, k in kinds.items() if k == "kv_cache"]
    described = ", ".join(f"{n}={k}" for n, k in kinds.items())
    report.add("two growing KV states", len(growing) >= 2,
               f"{described}; the engine needs at least 2 KV states (a dynamic dim). A static state named *cache* "
               "is taken for a sliding window", STATE_FACTORY)
    shapes = dict(states)
    for name in growing[:2]:
        tensor = shapes[name]
        seq = 3 if tensor is not None and len(tensor.shape) == 5 else 2
        report.add(f"{name} sequence dim", tensor is not None and len(tensor.shape) > seq and tensor.shape[seq] == -1,
                   f"{tensor.shape if tensor else '?'}: dim {seq} (rank {len(tensor.shape) if tensor else '?'}) must "
                   "be dynamic for the growing cache (else a fixed-size cache of max_context_length)", KV_CACHE)
    if len(growing) >= 2:
        key, value = shapes[growing[0]], shapes[growing[1]]
        report.add("K and V alike", key is not None and value is not None and key.shape == value.shape
                   and key.dtype == value.dtype, f"{growing[0]} and {growing[1]} share shape and dtype", PIPELINED)
    declared = language.get("states")
    if _is_str_map(declared):
        unknown = sorted(set(declared) - set(kinds))
        report.add("language.states name the asset's states", not unknown,
                   f"unknown: {unknown}" if unknown else "every name is a state of main", LANGUAGE_CONFIG)
        disagree = sorted(n for n, k in declared.items() if n in kinds and kinds[n] != k)
        report.add("language.states agree with the engine", not disagree,
                   "the pipelined engine ignores language.states and classifies by the heuristic: "
                   + (f"they differ on {disagree}" if disagree else "same kinds"), PIPELINED)
