"""The Qwen3-VL decoder against transformers' Qwen3VLForConditionalGeneration (fp32, tiny random checkpoint).

Our path is the seed's: our vision encoder per image, placeholders rewritten to `vocab + slot`, M-RoPE
derived in the graph from (ids, positions) and the per-image shift table. Checked: positions ==
`get_rope_index` (and `past_len + rope_delta` in decode) for mixed multi-image prompts; logits of a
two-image prompt as one chunk and as S=1 steps; greedy generation after an image prompt; text only.
"""

from __future__ import annotations

import pytest
import torch

from lmbundle.convert.checkpoint import open_checkpoint
from lmbundle.convert.convert import load_checkpoint_graph
from lmbundle.convert.vision_export import load_vision_encoder
from lmbundle.errors import LmbundleError
from lmbundle.models.image_prompt import ImageContext, prepare_image_prompt
from lmbundle.models.qwen3vl import Qwen3VLForStep

VOCAB, IMAGE, START, END = 160, 150, 148, 149
GRID = 14  # patches per side: 224x224 images, 7x7 = 49 tokens each (keeps the test fast)
MERGED = (GRID // 2, GRID // 2)
TOKENS = MERGED[0] * MERGED[1]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=48,
                  deepstack_visual_indexes=[0, 2])
    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                           vision_start_token_id=START, vision_end_token_id=END)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves norms at 1: spread them so the norm convention is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("qwen3vl")
    model.save_pretrained(folder)
    return folder, model


def _image(tokens=TOKENS):
    return [START] + [IMAGE] * tokens + [END]


def _prompt(*parts):
    """parts: lists of text ids, or "img" for one image."""
    ids = []
    for part in parts:
        ids += _image() if part == "img" else list(part)
    return torch.tensor(ids)


def _encode_images(folder, count, seed=0):
    pixels = torch.randn(count * GRID * GRID, 1536, generator=torch.Generator().manual_seed(seed))
    encoder = load_vision_encoder(folder, grid_side=GRID)
    with torch.no_grad():
        outputs = [encoder(pixels[i * GRID * GRID : (i + 1) * GRID * GRID]) for i in range(count)]
    return pixels, torch.tensor([[1, GRID, GRID]] * count), outputs


def _hf_inputs(ids, pixels, grid_thw):
    inputs = dict(input_ids=ids[None], mm_token_type_ids=(ids == IMAGE).int()[None])
    if grid_thw.numel():
        inputs.update(pixel_values=pixels, image_grid_thw=grid_thw)
    return inputs


PROMPTS = {
    "text_img_text": ([1, 2, 3], "img", [4, 5, 6]),
    "img_first": ("img", [7, 8]),
    "ends_with_img": ([9], "img"),
    "three_images": ([1], "img", [2, 3], "img", "img", [4, 5, 6, 7]),
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
@pytest.mark.parametrize("max_images", [None, 4])
def test_positions_equal_get_rope_index(tiny_vl, name, max_images):
    folder, ref = tiny_vl
    ids = _prompt(*PROMPTS[name])
    count = sum(part == "img" for part in PROMPTS[name])
    grid_thw = torch.tensor([[1, GRID, GRID]] * count)
    expected, delta = ref.model.get_rope_index(ids[None], (ids == IMAGE).int()[None], grid_thw)
    fake = [(torch.zeros(TOKENS, 48), torch.zeros(2 * TOKENS, 48))] * count
    new_ids, context = prepare_image_prompt(ids, IMAGE, VOCAB, fake, MERGED, max_images)
    model = load_checkpoint_graph(open_checkpoint(folder))
    model.set_images(context)
    positions = torch.arange(ids.numel())
    assert torch.equal(model.rope_positions(new_ids, positions), expected[:, 0])
    # decode: transformers places generated token n at past_len + rope_delta on all three axes
    decode = torch.arange(ids.numel(), ids.numel() + 5)
    ours = model.rope_positions(torch.full_like(decode, 3), decode)
    assert torch.equal(ours, (decode + delta[0]).expand(3, -1))


def test_image_prompt_logits_chunk_and_steps(tiny_vl):
    folder, ref = tiny_vl
    ids = _prompt([1, 2, 3], "img", [4, 5], "img", [6, 7, 8, 9])
    pixels, grid_thw, images = _encode_images(folder, 2)
    with torch.no_grad():
        expected = ref(**_hf_inputs(ids, pixels, grid_thw)).logits[0]
    model = load_checkpoint_graph(open_checkpoint(folder))
    assert isinstance(model, Qwen3VLForStep)
    new_ids, context = prepare_image_prompt(ids, IMAGE, VOCAB, images, MERGED, max_images=3)
    model.set_images(context)
    with torch.no_grad():
        chunk = model.forward_tokens(new_ids, 0, model.new_state(ids.numel()))
        state = model.new_state(ids.numel())
        steps = torch.cat([
            model.step(new_ids[i].view(1, 1), torch.tensor([i]), state, kv_len=i + 1)[0] for i in range(ids.numel())
        ])
    for name, ours in (("chunk", chunk), ("S=1 steps", steps)):
        worst = (ours - expected).abs().max().item()
        assert worst < TOLERANCE, f"{name}: worst logit difference {worst:.3g}"


def test_greedy_generation_after_image_prompt(tiny_vl):
    folder, ref = tiny_vl
    ids = _prompt([1, 2], "img", [3], "img", [4, 5, 6])
    pixels, grid_thw, images = _encode_images(folder, 2, seed=1)
    new_tokens = 12
    with torch.no_grad():
        generated = ref.generate(**_hf_inputs(ids, pixels, grid_thw), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)[0, ids.numel():]
    model = load_checkpoint_graph(open_checkpoint(folder))
    new_ids, context = prepare_image_prompt(ids, IMAGE, VOCAB, images, MERGED)
    model.set_images(context)
    state = model.new_state(ids.numel() + new_tokens)
    ours = []
    with torch.no_grad():
        token = model.forward_tokens(new_ids, 0, state, last_only=True).argmax(-1)
        for pos in range(ids.numel(), ids.numel() + new_tokens):
            ours.append(token.item())
            token = model.step(token.view(1, 1), torch.tensor([pos]), state, kv_len=pos + 1).argmax(-1)
    assert ours == generated.tolist()


def test_text_only_with_and_without_empty_context(tiny_vl):
    folder, ref = tiny_vl
    ids = torch.tensor([5, 17, 33, 2, 90, 41, 8])
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0]
    model = load_checkpoint_graph(open_checkpoint(folder))
    results = {}
    for name, context in (("none", None), ("empty", ImageContext.empty(48, 2, MERGED, 2))):
        model.set_images(context)
        with torch.no_grad():
            results[name] = model.forward_tokens(ids, 0, model.new_state(ids.numel()))
        worst = (results[name] - expected).abs().max().item()
        assert worst < TOLERANCE, f"{name}: worst logit difference {worst:.3g}"


def test_prepare_image_prompt_rejects_mismatches():
    image = (torch.zeros(TOKENS, 8), torch.zeros(0, 8))
    with pytest.raises(LmbundleError, match="placeholder tokens"):
        prepare_image_prompt(_prompt([1], "img"), IMAGE, VOCAB, [image, image], MERGED)
    with pytest.raises(LmbundleError, match="at most 1"):
        prepare_image_prompt(_prompt("img", "img"), IMAGE, VOCAB, [image, image], MERGED, max_images=1)
    ids, context = prepare_image_prompt(torch.tensor([1, 2, 3]), IMAGE, VOCAB, [], MERGED)
    assert ids.tolist() == [1, 2, 3] and context is None
    split = torch.tensor([IMAGE] * (TOKENS - 1) + [1, IMAGE])
    with pytest.raises(LmbundleError, match="not contiguous"):
        prepare_image_prompt(split, IMAGE, VOCAB, [image], MERGED)


def test_context_layout():
    embeds = [(torch.full((TOKENS, 4), float(k)), torch.full((2 * TOKENS, 4), 10.0 + k)) for k in range(2)]
    ids, context = prepare_image_prompt(_prompt([1], "img", [2], "img"), IMAGE, VOCAB, embeds, MERGED, max_images=3)
    assert ids[2 : 2 + TOKENS].tolist() == list(range(VOCAB, VOCAB + TOKENS))
    assert context.image_embeds.shape == (3 * TOKENS, 4) and context.deepstack_embeds.shape == (2 * 3 * TOKENS, 4)
    assert context.rope_shift_start.tolist() == [2 + TOKENS, 2 + TOKENS + 3 + TOKENS, 2**30]
    assert context.rope_shift_amount.tolist() == [TOKENS - 7, TOKENS - 7, 0]
    assert context.deepstack_embeds[3 * TOKENS + TOKENS].eq(11.0).all()  # level 1, image 1


def test_positions_at_the_shipped_448_grid(tiny_vl):
    """The seed's numbers: 196 tokens per 448x448 image, 14x14 merged grid, rope_delta -182 per image."""
    folder, ref = tiny_vl
    tokens, merged = 196, (14, 14)
    ids = torch.tensor([1, 2] + _image(tokens) + [3] + _image(tokens) + [4, 5])
    expected, delta = ref.model.get_rope_index(ids[None], (ids == IMAGE).int()[None], torch.tensor([[1, 28, 28]] * 2))
    fake = [(torch.zeros(tokens, 48), torch.zeros(2 * tokens, 48))] * 2
    new_ids, context = prepare_image_prompt(ids, IMAGE, VOCAB, fake, merged)
    model = load_checkpoint_graph(open_checkpoint(folder))
    model.set_images(context)
    assert torch.equal(model.rope_positions(new_ids, torch.arange(ids.numel())), expected[:, 0])
    assert delta.item() == -2 * 182


@pytest.fixture(scope="module")
def tiny_qwen35_vl(tmp_path_factory):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=48)
    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    config = Qwen3_5Config(vision_config=vision, text_config=text, image_token_id=IMAGE,
                           vision_start_token_id=START, vision_end_token_id=END)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "dt_bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("qwen35vl")
    model.save_pretrained(folder)
    return folder, model


def test_qwen35_image_prompt_logits(tiny_qwen35_vl):
    """The same mechanism on the GDN hybrid (no DeepStack): positions and logits vs transformers."""
    from lmbundle.bundle.load import load_weights
    from lmbundle.models.qwen35 import Qwen35Config, Qwen35ForStep

    folder, ref = tiny_qwen35_vl
    ids = _prompt([1, 2], "img", [3, 4], "img", [5, 6, 7])
    pixels, grid_thw, images = _encode_images(folder, 2)
    assert images[0][1].shape[0] == 0  # no DeepStack rows
    with torch.no_grad():
        expected = ref(**_hf_inputs(ids, pixels, grid_thw)).logits[0]
    expected_positions, _ = ref.model.get_rope_index(ids[None], (ids == IMAGE).int()[None], grid_thw)
    checkpoint = open_checkpoint(folder)
    model = Qwen35ForStep(Qwen35Config.from_hf(checkpoint.text_config, checkpoint.tie_word_embeddings))
    load_weights(model, checkpoint.text_tensors(), folder)
    new_ids, context = prepare_image_prompt(ids, IMAGE, VOCAB, images, MERGED, max_images=2)
    model.eval().set_images(context)
    assert torch.equal(model.rope_positions(new_ids, torch.arange(ids.numel())), expected_positions[:, 0])
    with torch.no_grad():
        ours = model.forward_tokens(new_ids, 0, model.new_state(ids.numel()))
    worst = (ours - expected).abs().max().item()
    assert worst < TOLERANCE, f"worst logit difference {worst:.3g}"


def test_config_reads_both_rope_layouts():
    """Hub config.json (rope_scaling + rope_theta) and transformers 5 (rope_parameters) give the same config."""
    from lmbundle.models.qwen3vl import Qwen3VLConfig

    base = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    hub = dict(base, rope_theta=5000000, rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                       "rope_type": "default"})
    v5 = dict(base, rope_parameters={"rope_theta": 5000000, "mrope_section": [24, 20, 20], "rope_type": "default"})
    assert Qwen3VLConfig.from_hf(hub) == Qwen3VLConfig.from_hf(v5)
    assert Qwen3VLConfig.from_hf(hub).rope_theta == 5000000 and Qwen3VLConfig.from_hf(hub).tie_word_embeddings
