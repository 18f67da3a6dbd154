"""Apple's bundle loader (`ModelBundle` + `LanguageBundle` + `LanguageConfig` decoding), read at 86b363d.
Every host loads a bundle through it (the zoo's apps use Apple's loader), so these rules are each
host's; the later pull requests only add optional keys (#240's chunk sizes, checked by apple_main).
"""

from __future__ import annotations

from .base import (
    BUNDLE_KIND,
    FAIL,
    LANGUAGE_BUNDLE,
    LANGUAGE_CONFIG,
    MODEL_BUNDLE,
    PASS,

    Add,
    Subject,
    at_86b,
    verdict,
)

BUNDLE_KINDS = ("llm", "vlm", "diffusion", "segmenter", "speech_recognizer")
STATE_KINDS = ("kv_cache", "sliding_cache", "fixed")
IMAGE_STRATEGIES = ("stretch", "center_crop", "pad")
IMAGE_PREPROCESSOR = "CoreAIShared/Image/ImagePreprocessor.swift"
INT32 = (-(2**31), 2**31 - 1)
# VisionConfig's keys and the JSON types it decodes them as (a wrong type fails the whole decode)
VISION_KEYS = {"image_size": "int", "patch_size": "int", "image_token_count": "int", "image_token_id": "int32",
               "image_mean": "numbers", "image_std": "numbers", "rescale_factor": "number",
               "image_strategy": "strategy", "include_image_info": "bool", "max_video_frames": "int",
               "tokens_per_frame": "int"}
REQUIRED_VISION = ("image_size", "patch_size", "image_token_count", "image_token_id")

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

def _typed(value, kind: str) -> bool:
    number = (_is_int(value) or isinstance(value, float))
    return {"int": _is_int(value), "int32": _is_int(value) and INT32[0] <= value <= INT32[1],
            "numbers": isinstance(value, list) and all(_is_int(v) or isinstance(v, float) for v in value),
            "number": number, "bool": isinstance(value, bool),
            "strategy": value in IMAGE_STRATEGIES}[kind]

def _is_str_map(value, item=str) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, item) for k, v in value.items())

def asset_exists(subject: Subject, path: str) -> bool:
    """An asset path resolves to the file, or for `.aimodel` to its compiled `.aimodelc` sibling."""
    folder = subject.folder
    return (folder / path).exists() or (path.endswith(".aimodel") and (folder / (path + "c")).exists())

def check(subject: Subject, add: Add) -> None:
    meta, language = subject.meta, subject.language
    version = meta.get("metadata_version")
    add("metadata_version", verdict(version == "0.2"), f"{version!r}: the loader knows only \"0.2\" (absent reads "
        "as \"0.1\")", at_86b(MODEL_BUNDLE, "178-179"))
    kind = meta.get("kind")
    add("kind", verdict(kind in ("llm", "vlm")), f"{kind!r}: a LanguageBundle is llm or vlm (BundleKind: "
        f"{', '.join(BUNDLE_KINDS)})", at_86b(LANGUAGE_BUNDLE, "36") + "; " + at_86b(BUNDLE_KIND, "12-13"))
    add("name", verdict(isinstance(meta.get("name"), str) and bool(meta.get("name"))), f"{meta.get('name')!r}: "
        "a non-empty string", at_86b(MODEL_BUNDLE, "211"))
    assets = subject.assets
    add("assets.main", verdict(isinstance(assets.get("main"), str)), f"{assets.get('main')!r}: LanguageBundle "
        "requires it", at_86b(LANGUAGE_BUNDLE, "41-43"))
    for key, path in sorted(assets.items()):
        ok = isinstance(path, str) and asset_exists(subject, path)
        add(f"assets.{key} exists", verdict(ok), f"{path} (or its compiled {path}c) in the bundle folder",
            at_86b(MODEL_BUNDLE, "82-88"))
    add("language", verdict(bool(language)), "the language section (LanguageBundle requires it)",
        at_86b(LANGUAGE_BUNDLE, "44-46"))
    if not language:
        return
    for key, kind_of in (("tokenizer", str), ("vocab_size", int), ("max_context_length", int)):
        value = language.get(key)
        ok = isinstance(value, kind_of) and not isinstance(value, bool) and (kind_of is str or value > 0)
        add(f"language.{key}", verdict(ok), f"{value!r}: {'a string' if kind_of is str else 'a positive integer'}",
            at_86b(LANGUAGE_CONFIG, "62-64"))
    embedded = language.get("embedded_tokenizer", True)
    has_file = (subject.folder / "tokenizer" / "tokenizer.json").is_file()
    add("embedded tokenizer", verdict(not embedded or has_file),
        "tokenizer/tokenizer.json is read first (embedded_tokenizer, default true); language.tokenizer is only "
        "the hub id fetched without it, so a local checkpoint's folder name is enough there"
        if has_file else "embedded_tokenizer is true but tokenizer/tokenizer.json is missing: the loader falls back "
        f"to fetching {language.get('tokenizer')!r} from the hub", at_86b(LANGUAGE_BUNDLE, "82-98"))
    function_map = language.get("function_map")
    if function_map is not None:
        ok = isinstance(function_map, dict) and all(
            isinstance(v, list) and v and all(isinstance(n, str) for n in v) for v in function_map.values())
        add("language.function_map", verdict(ok), "role -> non-empty list of function names",
            at_86b(LANGUAGE_CONFIG, "66") + "; " + at_86b("CoreAIShared/Bundle/FunctionMap.swift", "35-37"))
    states = language.get("states")
    if states is not None:
        add("language.states", verdict(_is_str_map(states) and all(v in STATE_KINDS for v in states.values())),
            f"state name -> one of {', '.join(STATE_KINDS)}", at_86b(LANGUAGE_CONFIG, "68"))
    vision = meta.get("vision")
    if kind == "vlm":
        add("vision (kind vlm)", verdict(isinstance(vision, dict)), "a vlm bundle needs the vision section",
            at_86b(LANGUAGE_BUNDLE, "51-53"))
    if isinstance(vision, dict):
        _vision_keys(vision, add)

def _vision_keys(vision: dict, add: Add) -> None:
    """VisionConfig decodes the top-level `vision` section strictly: required keys, and the JSON type of
    every key it knows (lmbundle's own keys beside them are ignored)."""
    missing = [k for k in REQUIRED_VISION if k not in vision]
    wrong = [f"{k}={vision[k]!r} (not {kind})" for k, kind in VISION_KEYS.items()
             if k in vision and vision[k] is not None and not _typed(vision[k], kind)]
    detail = ("missing " + ", ".join(missing) + "; " if missing else "") + (", ".join(wrong) or "every key typed "
              "as VisionConfig decodes it (image_size, patch_size, image_token_count Int; image_token_id Int32; "
              "image_mean/std [Double]; rescale_factor Double; image_strategy stretch|center_crop|pad; "
              "include_image_info Bool)")
    add("VisionConfig keys", PASS if not (missing or wrong) else FAIL, detail,
        at_86b(LANGUAGE_CONFIG, "251-263") + "; " + at_86b(IMAGE_PREPROCESSOR, "14-18"))
