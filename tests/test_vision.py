"""The vision side against transformers: our preprocessing vs the Qwen2-VL image processor (PIL backend)
and our encoder vs `model.visual` of tiny random Qwen3-VL / Qwen3.5 checkpoints, plus bad-image errors."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lmbundle.convert.vision_export import image_spec_from_configs, image_spec_of, load_vision_encoder
from lmbundle.engine.image import load_image, preprocess_image
from lmbundle.errors import LmbundleError
from lmbundle.models.vision import VisionConfig, VisionEncoder, sanitize
from tests.checkpoints import PROCESSOR, image_processor

VISION = dict(
    depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=48,
    patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
)
TEXT = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=24)
TOLERANCE = 1e-4


def _vl_model(family: str, deepstack: list[int]):
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        vision = dict(VISION, deepstack_visual_indexes=deepstack)
    else:
        from transformers import Qwen3_5Config as Config
        from transformers import Qwen3_5ForConditionalGeneration as Model

        vision = dict(VISION)
    torch.manual_seed(0)
    model = Model(Config(vision_config=vision, text_config=TEXT)).eval()
    with torch.no_grad():  # random init leaves norms at 1/0 and biases at 0: spread them so they are tested
        for name, p in model.model.visual.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=[("qwen3_vl", [0, 2]), ("qwen3_vl", [2, 1]), ("qwen3_5", [])],
                ids=["qwen3_vl", "qwen3_vl_unsorted_taps", "qwen3_5"])
def vl_checkpoint(request, tmp_path_factory):
    family, deepstack = request.param
    model = _vl_model(family, deepstack)
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder, model


def _random_image(rng, width, height, mode="RGB"):
    channels = len(mode)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def test_encoder_matches_transformers(vl_checkpoint):
    folder, model = vl_checkpoint
    encoder = load_vision_encoder(folder)
    patches = torch.randn(784, 1536, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.model.visual(patches, grid_thw=torch.tensor([[1, 28, 28]]))
        image_embeds, deepstack_embeds = encoder(patches)
    taps = model.config.vision_config.to_dict().get("deepstack_visual_indexes") or []
    assert image_embeds.shape == (196, 48) and deepstack_embeds.shape == (len(taps) * 196, 48)
    embeds_diff = (image_embeds - ref.pooler_output).abs().max().item()
    assert embeds_diff < TOLERANCE, f"image_embeds max |diff| {embeds_diff:.2e}"
    if taps:
        ref_deepstack = torch.cat(ref.deepstack_features)
        deepstack_diff = (deepstack_embeds - ref_deepstack).abs().max().item()
        assert deepstack_diff < TOLERANCE, f"deepstack_embeds max |diff| {deepstack_diff:.2e}"


def test_end_to_end_image_matches_transformers(vl_checkpoint):
    """Our preprocessing + encoder vs the processor + `model.visual` on one image the processor keeps at 448x448."""
    folder, model = vl_checkpoint
    image = _random_image(np.random.default_rng(2), 448, 448)
    prepared = preprocess_image(image, image_spec_of(folder))
    ref_inputs = image_processor()(images=image, return_tensors="pt")
    with torch.no_grad():
        ref = model.model.visual(ref_inputs["pixel_values"], grid_thw=ref_inputs["image_grid_thw"])
        image_embeds, _ = load_vision_encoder(folder)(prepared.patches)
    assert (image_embeds - ref.pooler_output).abs().max().item() < TOLERANCE


def test_fp16_encoder_stays_close(vl_checkpoint):
    """fp16 is the vision bundle's default: embeddings cosine vs fp32 at the seed's gate (>= 0.9997)."""
    folder, _ = vl_checkpoint
    patches = torch.randn(784, 1536, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = load_vision_encoder(folder)(patches)
        half, _ = load_vision_encoder(folder, dtype=torch.float16)(patches)
    cosine = torch.nn.functional.cosine_similarity(full, half.float(), dim=-1).min().item()
    assert cosine >= 0.9997, f"fp16 vs fp32 min per-token cosine {cosine:.6f}"


@pytest.mark.parametrize("size, mode", [((448, 448), "RGB"), ((460, 440), "RGBA"), ((435, 450), "P")])
def test_preprocess_matches_processor(size, mode):
    """Sizes whose aspect-preserving resize is also 448x448, so the processor and our stretch agree."""
    rng = np.random.default_rng(0)
    image = _random_image(rng, *size, mode="RGB" if mode == "P" else mode)
    if mode == "P":
        image = image.quantize(64)
        image.info["transparency"] = 5
    spec = image_spec_from_configs({"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}, PROCESSOR)
    prepared = preprocess_image(image, spec)
    ref = image_processor()(images=image, return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [list(prepared.grid_thw)] == [[1, 28, 28]]
    diff = (prepared.patches - ref["pixel_values"]).abs().max().item()
    assert diff < 1e-5, f"patches max |diff| {diff:.2e}"
    assert (prepared.notice is None) == (size == (448, 448))
    if prepared.notice:
        assert f"{size[0]}x{size[1]}" in prepared.notice and "448x448" in prepared.notice


def test_preprocess_accepts_path_and_bytes(tmp_path):
    image = _random_image(np.random.default_rng(4), 100, 60)
    path = tmp_path / "photo.png"
    image.save(path)
    spec = image_spec_from_configs({}, PROCESSOR)
    from_path = preprocess_image(path, spec)
    from_bytes = preprocess_image(path.read_bytes(), spec)
    assert torch.equal(from_path.patches, from_bytes.patches) and from_path.patches.shape == (784, 1536)
    assert from_path.source_size == (100, 60) and "100x60" in from_path.notice


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _encoded(fmt):
    buffer = io.BytesIO()
    _random_image(np.random.default_rng(5), 64, 64).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, words",
    [
        (b"just some text, not pixels", "not an image"),
        (_encoded("PNG")[:2000], "truncated"),
        (_encoded("JPEG")[:900], "truncated"),
        (_png_header(8000, 7500), "60.0 megapixels"),
    ],
    ids=["not_an_image", "truncated_png", "truncated_jpeg", "60_megapixels"],
)
def test_bad_images_are_named(data, words):
    with pytest.raises(LmbundleError, match=words) as info:
        load_image(data)
    assert "\n" not in str(info.value)


def test_lazily_opened_truncated_pil_image():
    with pytest.raises(LmbundleError, match="truncated"):
        load_image(Image.open(io.BytesIO(_encoded("JPEG")[:900])))


def test_missing_image_file(tmp_path):
    with pytest.raises(LmbundleError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_spec_from_checkpoint(vl_checkpoint, tmp_path):
    folder, _ = vl_checkpoint
    spec = image_spec_of(folder)
    assert spec.mean == tuple(PROCESSOR["image_mean"]) and spec.grid_thw == (1, 28, 28)
    assert (spec.num_patches, spec.num_tokens, spec.patch_dim) == (784, 196, 1536)
    bad = dict(PROCESSOR, patch_size=14)
    with pytest.raises(LmbundleError, match="patch_size"):
        image_spec_from_configs({"patch_size": 16}, bad)
    # transformers 5 writes the processor as processor_config.json with the image processor nested
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(LmbundleError, match="no image processor settings"):
        image_spec_of(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": PROCESSOR}))
    assert image_spec_of(tmp_path) == spec


def test_sanitize_is_idempotent_and_takes_both_prefixes(vl_checkpoint):
    _, model = vl_checkpoint
    checkpoint_names = {f"model.visual.{k}": v for k, v in model.model.visual.state_dict().items()}
    checkpoint_names["model.language_model.embed_tokens.weight"] = torch.zeros(1)
    once = dict(sanitize(checkpoint_names.items()))
    twice = dict(sanitize(once.items()))
    old_layout = dict(sanitize((k.removeprefix("model."), v) for k, v in checkpoint_names.items()))
    assert once.keys() == twice.keys() == old_layout.keys()
    assert once["patch_embed.proj.weight"].shape == (64, 1536)
    config = json.loads(json.dumps(model.config.vision_config.to_dict()))
    encoder = VisionEncoder(VisionConfig.from_hf(config))
    assert set(once) == set(encoder.state_dict())
