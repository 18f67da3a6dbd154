"""Tiny checkpoints made by transformers' classes (random init, save_pretrained): Qwen3.5 text ones, and
image-text ones (Qwen3-VL, Qwen3.5 with vision) with the images and messages their tests feed them.

Each config varies what the graph must get right: the layer pattern, GQA ratios, head dims,
key vs value head counts of the GDN layers, tied vs untied heads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    tie_word_embeddings=False,
)

TINY_CONFIGS = {
    "base": dict(BASE),
    "tied_mha": dict(BASE, tie_word_embeddings=True, num_key_value_heads=4, head_dim=16),
    "deep_pattern": dict(
        BASE,
        num_hidden_layers=6,
        layer_types=["linear_attention", "full_attention", "linear_attention",
                     "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=8, num_key_value_heads=1, head_dim=64,
    ),
    "equal_gdn_heads": dict(
        BASE, linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=16, linear_conv_kernel_dim=3, hidden_size=96, intermediate_size=160,
    ),
    # head dims the Triton mixers do not tile (not powers of two): their ops must fall back, not break
    "odd_dims": dict(BASE, head_dim=24, linear_key_head_dim=24, linear_value_head_dim=40, hidden_size=96,
                     intermediate_size=160),
}

# The real configs (random weights): qwen-facts.md, checked against the installed transformers.
REAL_CONFIGS = {
    "Qwen3.5-0.8B": dict(
        vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
        linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, tie_word_embeddings=True, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        eos_token_id=248044,
    ),
}
REAL_CONFIGS["Qwen3.5-2B"] = dict(REAL_CONFIGS["Qwen3.5-0.8B"], hidden_size=2048, intermediate_size=6144)


def make_qwen35(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, fresh: bool = False,
                **config) -> Path:
    """Save a random-init Qwen3_5ForCausalLM with the given text config; returns the folder. `fresh`:
    exactly as transformers initialises it (uniform norms, dt_bias = ones), else with spread norms."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    cfg = Qwen3_5TextConfig(**config)
    model = Qwen3_5ForCausalLM(cfg).to(dtype)
    if not fresh:
        _spread_gdn_params(model)
    model.save_pretrained(folder)
    return folder


def _spread_gdn_params(model: torch.nn.Module) -> None:
    """Random-init norms are all zeros/ones; give them spread so norm conventions are actually tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.1)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model speaks plain English. "
    "Once upon a time there was a little cat who lived in a house by the sea. "
)


# A template with Qwen3.5's conventions (written for these tests from the documented format): tools in
# the system turn, assistant tool calls as <tool_call><function=...><parameter=...> blocks, tool results in
# a user turn as <tool_response>, and the generation prompt opening <think> unless enable_thinking is false.
QWEN35_STYLE_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

<tools>
{%- for tool in tools %}
{{- '\n' + (tool | tojson) }}
{%- endfor %}
{{- '\n' }}</tools>

To call a function reply with
<tool_call>
<function=NAME>
<parameter=ARG>
VALUE
</parameter>
</function>
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' and not loop.first %}{{ raise_exception('System message must be at the beginning.') }}
{%- elif m.role == 'system' %}
{%- elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}
{{- '\n<tool_call>\n<function=' + c.function.name + '>\n' }}
{%- for k, v in c.function.arguments.items() %}
{{- '<parameter=' + k + '>\n' + (v if v is string else (v | tojson)) + '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""


def make_tokenizer(folder: Path, vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS,
                   template: str = CHAT_TEMPLATE, text: str = _TEXT):
    """A byte-level BPE tokenizer with Qwen's chat tokens and a chat template, trained on `text` to fit the
    model's vocab (the special tokens take the first ids, in order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(folder)
    return fast


def make_qwen35_with_tokenizer(folder: Path, fresh: bool = False, **config) -> Path:
    make_qwen35(folder, fresh=fresh, **config)
    make_tokenizer(folder, config["vocab_size"])
    return folder


# -- vision-language checkpoints (Qwen3-VL, and Qwen3.5 with its vision tower) ------------------------------
VLM_VOCAB, VISION_START, VISION_END, IMAGE_PAD = 320, 3, 4, 5  # the tokenizer's special ids, in config.json
VLM_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>"]
VLM_TEMPLATE = (  # the shape of Qwen3-VL's template: one <|image_pad|> per image part
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.48, 0.46, 0.41],
                 image_std=[0.27, 0.26, 0.28], size={"shortest_edge": 65536, "longest_edge": 16777216})
_VISION = dict(hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64)
_ROPE = {"rope_type": "default", "mrope_interleaved": True}
VLM_TEXT = {
    "qwen3_vl": dict(vocab_size=VLM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rope_parameters=dict(_ROPE, rope_theta=5e6, mrope_section=[4, 2, 2])),
    "qwen3_5": dict(vocab_size=VLM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                    rope_parameters=dict(_ROPE, rope_theta=1e7, partial_rotary_factor=0.5, mrope_section=[2, 1, 1])),
}


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**PROCESSOR)


def make_vlm(family: str, folder: Path) -> torch.nn.Module:
    """Save a random-init image-text checkpoint ("qwen3_vl" or "qwen3_5") with its tokenizer and image
    processor; returns the transformers model (the reference)."""
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        vision = dict(_VISION, depth=3, deepstack_visual_indexes=[0, 2])
    else:
        from transformers import Qwen3_5Config as Config
        from transformers import Qwen3_5ForConditionalGeneration as Model

        vision = dict(_VISION, depth=2)
    torch.manual_seed(0)
    config = Config(vision_config=vision, text_config=VLM_TEXT[family], image_token_id=IMAGE_PAD,
                    vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = Model(config).eval()
    with torch.no_grad():  # spread norms, biases and dt_bias so their conventions are exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer = make_tokenizer(folder, VLM_VOCAB, VLM_SPECIAL_TOKENS, VLM_TEMPLATE,
                               "Describe the image. A cat sat on the mat by the sea, and then it ran.")
    assert tokenizer.convert_tokens_to_ids(VLM_SPECIAL_TOKENS[3:]) == [VISION_START, VISION_END, IMAGE_PAD]
    image_processor().save_pretrained(folder)
    return model


def random_image(seed: int, width: int, height: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_message(images, text: str = "Describe the image.") -> list[dict]:
    """One user message: the images, then the text."""
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


VL_SIDE = 64  # make_qwen3vl_with_tokenizer's largest image: the bundle's fixed size, 2 x 2 = 4 tokens an image


def make_qwen3vl_with_tokenizer(folder: Path, seed: int = 0, fresh: bool = True) -> Path:
    """A tiny Qwen3-VL (3 text layers, a 2-block vision tower with 2 DeepStack levels, tied head) exactly as
    transformers initialises it, with its tokenizer and a 64x64 image processor (tiny image prompts)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    vision = dict(_VISION, depth=2, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                  num_position_embeddings=256, deepstack_visual_indexes=[0, 1])
    config = Qwen3VLConfig(vision_config=vision, text_config=VLM_TEXT["qwen3_vl"], image_token_id=IMAGE_PAD,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                           tie_word_embeddings=True)
    model = Qwen3VLForConditionalGeneration(config).eval()
    if not fresh:
        _spread_gdn_params(model)
    model.save_pretrained(folder)
    make_tokenizer(folder, VLM_VOCAB, VLM_SPECIAL_TOKENS, VLM_TEMPLATE)
    Qwen2VLImageProcessorPil(**dict(PROCESSOR, size={"shortest_edge": 32 * 32, "longest_edge": VL_SIDE * VL_SIDE})
                             ).save_pretrained(folder)
    return folder
