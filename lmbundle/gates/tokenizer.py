"""The bundle's text side against the checkpoint's: tokenizer (vocabulary, special tokens, chat
template, and encoding and decoding a fixed multilingual text byte for byte, through the engine's own
streaming decoder too) and the generation config's token ids (eos, bos, pad; generation must stop at
every id the checkpoint ends a turn with)."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.engine import Engine
from ..engine.outputs import StreamDecoder
from .oracle import Oracle

# Scripts, accents, emoji (a ZWJ sequence), digits, code, whitespace runs: what byte-level BPE, its
# pre-tokenizer and its decoder must all get right.
FIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. Déjà vu: naïve café, Straße, Œuvre, señor!\n"
    "Ελληνικά, русский язык, العربية, हिन्दी, 中文的句子，日本語の文章、한국어 문장.\n"
    "Emoji: 👍🏽 👨‍👩‍👧 🎉  Numbers: 3.14159, 1,000,000, 2024-12-07.\n"
    "def f(x):\n\treturn x ** 2  # two spaces  and a tab\r\n    trailing   spaces   \n\n"
)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! ¿Qué tal? 你好"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "Tell me about love."},
]


def check_tokenizer(engine: Engine, oracle: Oracle, texts) -> list[str]:
    """The bundle's tokenizer must be the checkpoint's: same vocabulary, special tokens and chat template;
    every gate text and a fixed multilingual text with the special tokens among its words encode to the
    same ids, and the oracle's ids decode to the same text (as a whole, token by token, and streamed
    the way the engine streams)."""
    ours, theirs = engine.tokenizer, oracle.tokenizer
    problems = []
    vocab_ours, vocab_theirs = ours.get_vocab(), theirs.get_vocab()
    if vocab_ours != vocab_theirs:
        differ = sorted(set(vocab_ours.items()) ^ set(vocab_theirs.items()), key=lambda kv: kv[1])
        token = differ[0][0]
        problems.append(f"{len(differ) // 2 or len(differ)} vocabulary entries differ "
                        f"(e.g. {token!r} -> {vocab_ours.get(token)} vs the oracle's {vocab_theirs.get(token)})")
    if getattr(ours, "chat_template", None) != getattr(theirs, "chat_template", None):
        problems.append("chat template differs")
    if ours.all_special_tokens != theirs.all_special_tokens:
        problems.append("special tokens differ")
    fixed = " ".join(theirs.all_special_tokens) + FIXED_TEXT + "".join(theirs.all_special_tokens)
    samples = [fixed, *texts]
    for special in (False, True):
        bad = [t for t in samples if ours.encode(t, add_special_tokens=special) !=
               theirs.encode(t, add_special_tokens=special)]
        if bad:
            problems.append(f"{len(bad)} texts encode differently{' with special tokens' if special else ''} "
                            f"(e.g. {bad[0][:30]!r})")
            break
    ids = theirs.encode(fixed, add_special_tokens=False)
    problems += _decoding(ours, theirs, ids)
    if getattr(theirs, "chat_template", None) and getattr(ours, "chat_template", None):
        rendered = [t.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
                    for t in (ours, theirs)]
        if rendered[0] != rendered[1]:
            problems.append("a conversation renders differently")
    return [f"tokenizer differs from the oracle's: {'; '.join(problems)}"] if problems else []


def _decoding(ours, theirs, ids: list[int]) -> list[str]:
    for skip in (False, True):
        mine, expected = ours.decode(ids, skip_special_tokens=skip), theirs.decode(ids, skip_special_tokens=skip)
        if mine != expected:
            at = next((i for i, (a, b) in enumerate(zip(mine, expected)) if a != b), min(len(mine), len(expected)))
            return [f"the fixed text decodes differently (at character {at}: {mine[at:at + 12]!r} vs the "
                    f"oracle's {expected[at:at + 12]!r})"]
    pieces = [i for i in ids if ours.decode([i]) != theirs.decode([i])]
    if pieces:
        return [f"{len(pieces)} tokens decode differently one by one (e.g. id {pieces[0]})"]
    stream = StreamDecoder(ours)
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    if streamed != theirs.decode(ids, skip_special_tokens=True):
        return ["the engine's streamed text differs from the oracle's decode"]
    return []


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else sorted(value)


def _generation_ids(folder: Path) -> dict[str, list[int]]:
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {key: _ids(config.get(key)) for key in ("eos_token_id", "bos_token_id", "pad_token_id")}


def check_generation_config(engine: Engine, oracle: Oracle) -> list[str]:
    """eos / bos / pad ids of the bundle's generation config against the checkpoint's, and the engine's
    stop ids against every id the checkpoint ends generation with."""
    ours = _generation_ids(engine.bundle.tokenizer_path)
    theirs = _generation_ids(oracle.checkpoint.path)
    problems = [f"{key} {ours[key]} (checkpoint {theirs[key]})" for key in theirs if ours[key] != theirs[key]]
    ends = set(theirs["eos_token_id"]) | set(_ids(oracle.checkpoint.text_config.get("eos_token_id")))
    missing = sorted(ends - set(engine.stop_ids))
    if missing:
        problems.append(f"generation does not stop at {missing} (the checkpoint's eos)")
    return [f"generation config differs from the checkpoint's: {'; '.join(problems)}"] if problems else []
