"""Image chat end to end: tiny random Qwen3-VL and Qwen3.5-with-vision checkpoints -> one bundle each
(decoder + vision.safetensors) -> Engine with images, against the fp32 transformers model fed the
processor's pixel values (our stretch to 448x448 done first with PIL, then Qwen2VLImageProcessorPil).

Checked: teacher-forced logits over image prompts (one and two images; fp16 and int8hu), greedy
identity (fp16), text-only output unchanged by the persistent image context, each image encoded once,
bad input as one LmbundleError line, `lmbundle run --image` printing the resize notice once, the
image part of `lmbundle gate` (also on the trained demo Qwen3-VL), and the optional Core AI vision asset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmbundle.cli import main as cli_main
from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.errors import LmbundleError

VOCAB, START, END, IMAGE = 320, 3, 4, 5  # the tokenizer's special ids, written into config.json
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
TEMPLATE = (  # the shape of Qwen3-VL's template: one <|image_pad|> per image part
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.48, 0.46, 0.41],
                 image_std=[0.27, 0.26, 0.28], size={"shortest_edge": 65536, "longest_edge": 16777216})
VISION = dict(hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64)
ROPE = {"rope_type": "default", "mrope_interleaved": True}
TEXT = {
    "qwen3_vl": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rope_parameters=dict(ROPE, rope_theta=5e6, mrope_section=[4, 2, 2])),
    "qwen3_5": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                    rope_parameters=dict(ROPE, rope_theta=1e7, partial_rotary_factor=0.5, mrope_section=[2, 1, 1])),
}
SMALL_CONTEXT = 512  # the int8hu bundles: two images fit, three do not


pytestmark = pytest.mark.usefixtures("one_thread")


def _processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**PROCESSOR)


def _save_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Describe the image. A cat sat on the mat by the sea, and then it ran."] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    assert fast.convert_tokens_to_ids(SPECIAL[3:]) == [START, END, IMAGE]


def _make_checkpoint(family, folder):
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        vision = dict(VISION, depth=3, deepstack_visual_indexes=[0, 2])
    else:
        from transformers import Qwen3_5Config as Config
        from transformers import Qwen3_5ForConditionalGeneration as Model

        vision = dict(VISION, depth=2)
    torch.manual_seed(0)
    config = Config(vision_config=vision, text_config=TEXT[family], image_token_id=IMAGE,
                    vision_start_token_id=START, vision_end_token_id=END)
    model = Model(config).eval()
    with torch.no_grad():  # spread norms, biases and dt_bias so their conventions are exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    _processor().save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5"])
def vlm(request, tmp_path_factory):
    """(family, reference model, {quant: Engine}, checkpoint folder) for one tiny checkpoint converted twice."""
    root = tmp_path_factory.mktemp(request.param)
    ref = _make_checkpoint(request.param, root / "ckpt")
    engines = {}
    for quant, context in (("fp16", 4096), ("int8hu", SMALL_CONTEXT)):
        bundle = convert(str(root / "ckpt"), root / quant, quant=quant, backend="torch", max_context=context, log=None)
        engines[quant] = Engine(bundle, backend="torch", device="cpu")
    return request.param, ref, engines, root / "ckpt"


def _image(seed, width, height):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _message(images, text="Describe the image."):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def _hf_inputs(ids, images):
    """The reference's inputs: placeholders restored, the processor's pixel values of the stretched images."""
    raw = torch.tensor([IMAGE if t >= VOCAB else t for t in ids])
    inputs = dict(input_ids=raw[None], mm_token_type_ids=(raw == IMAGE).int()[None])
    if images:
        stretched = [im.resize((448, 448), Image.Resampling.BICUBIC) if im.size != (448, 448) else im for im in images]
        processed = _processor()(images=stretched, return_tensors="pt")
        assert processed["image_grid_thw"].tolist() == [[1, 28, 28]] * len(images)
        inputs.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
    return inputs


def _teacher_forced(engine, ids):
    """Per-position logits [S, V] of the engine's graph over the whole prompt (one chunk; the S=1
    path is what `generate` runs in the greedy test)."""
    engine.vision.activate(ids)
    model = engine.backend.model
    with torch.inference_mode():
        return model.forward_tokens(torch.tensor(ids), 0, model.new_state(len(ids))).float()


def _compare(ours, expected, min_cosine):
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1).min().item()
    assert cosine >= min_cosine, f"worst per-position logits cosine {cosine:.6f}"
    top2 = expected.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) >= 0.01  # flips within a near tie are not errors
    agree = (ours.argmax(-1) == expected.argmax(-1)) | ~decided
    assert agree.all(), f"top-1 differs at positions {(~agree).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("quant, count, min_cosine", [("fp16", 2, 0.9999), ("int8hu", 1, 0.999)])
def test_image_prompt_logits_match_transformers(vlm, quant, count, min_cosine):
    _, ref, engines, _ = vlm
    engine = engines[quant]
    images = [_image(1, 500, 300), _image(2, 448, 448)][:count]  # one stretched, one at the fixed size
    ids = engine.chat_ids(_message(images))
    assert len(ids) > count * 196 and sum(t >= VOCAB for t in ids) == count * 196
    with torch.no_grad():
        expected = ref(**_hf_inputs(ids, images)).logits[0]
    _compare(_teacher_forced(engine, ids), expected, min_cosine)


def test_greedy_identical_fp16(vlm):
    _, ref, engines, _ = vlm
    engine = engines["fp16"]
    images = [_image(3, 640, 480)]
    ids = engine.chat_ids(_message(images, "What is in it?"))
    with torch.no_grad():
        expected = ref.generate(**_hf_inputs(ids, images), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ours = list(engine.generate(ids, max_new_tokens=12, stop=False))
    assert ours == expected[0, len(ids):].tolist()


def test_text_only_unchanged_by_the_image_context(vlm):
    """After an image prompt, a text prompt runs on the zeroed context: bit-identical to no context."""
    _, ref, engines, _ = vlm
    engine = engines["fp16"]
    model = engine.backend.model
    _teacher_forced(engine, engine.chat_ids(_message([_image(4, 448, 448)])))
    ids = engine.chat_ids([{"role": "user", "content": "A cat sat on the mat."}])
    with_context = _teacher_forced(engine, ids)  # activates the text prompt: the context is zeroed
    assert model.images is engine.vision.context and engine.vision.context.image_embeds.abs().max() == 0
    model.set_images(None)
    try:
        without = _teacher_forced(engine, ids)
    finally:
        model.set_images(engine.vision.context)
    assert torch.equal(with_context, without)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0]
    _compare(with_context, expected, 0.9999)


def test_each_image_is_encoded_once(vlm):
    _, _, engines, _ = vlm
    vision = engines["int8hu"].vision
    before = len(vision.encode_seconds)
    image = _image(5, 320, 240)
    first = engines["int8hu"].chat_ids(_message([image, image]))
    again = engines["int8hu"].chat_ids(_message([image.copy()], "And now?"))
    assert len(vision.encode_seconds) == before + 1
    assert first[first.index(VOCAB) : first.index(VOCAB) + 3] == [VOCAB, VOCAB + 1, VOCAB + 2]
    assert VOCAB + 196 in first and VOCAB in again


def _png_header(width, height):
    """A valid PNG signature + header claiming width x height (no need for the pixels)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_bad_input_is_one_clear_line(vlm, tmp_path):
    _, _, engines, _ = vlm
    engine = engines["int8hu"]
    text_file = tmp_path / "notes.png"
    text_file.write_text("not pixels")
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(10000, 6000))
    cases = {
        "not an image": lambda: engine.attach_images([text_file]),
        "60.0 megapixels": lambda: engine.attach_images([huge]),
        "not found": lambda: engine.attach_images([tmp_path / "missing.jpg"]),
        "at most 4": lambda: engine.chat_ids(_message([_image(k, 64, 64) for k in range(5)])),
        "context too long": lambda: engine.chat_ids(_message([_image(k, 64, 64) for k in range(3)])),
        "not the images": lambda: list(engine.generate([1, 2, VOCAB, VOCAB + 1, 6], max_new_tokens=1)),
    }
    damaged = tmp_path / "damaged"
    shutil.copytree(engine.bundle.path, damaged)
    with open(damaged / "vision.safetensors", "r+b") as handle:
        handle.seek(-3, 2)
        handle.write(b"xyz")
    cases["sha256 does not match"] = lambda: Engine(damaged, backend="torch", device="cpu")
    for words, call in cases.items():
        with pytest.raises(LmbundleError, match=words) as info:
            call()
        assert "\n" not in str(info.value), words
    # a template that does not place images: the image has no placeholder in the prompt
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'][-1]['text'] }}\n{% endfor %}"
    try:
        with pytest.raises(LmbundleError, match="0 image placeholder"):
            engine.chat_ids(_message([_image(6, 64, 64)]))
    finally:
        engine.tokenizer.chat_template = template


def test_bundle_vision_section(vlm):
    family, ref, engines, _ = vlm
    bundle = engines["fp16"].bundle
    vision = bundle.metadata["vision"]
    deepstack = 2 if family == "qwen3_vl" else 0
    tokens = (vision["image_token_id"], vision["vision_start_token_id"], vision["vision_end_token_id"])
    assert tokens == (IMAGE, START, END) and vision["tokens_per_image"] == 196 and vision["grid_thw"] == [1, 28, 28]
    assert vision["num_deepstack"] == deepstack
    assert vision["outputs"]["deepstack_embeds"] == [deepstack * 196, 64]
    assert "vision.safetensors" in bundle.info["files"] and vision["dtype"] == "float16"
    with torch.no_grad():  # the bundled fp16 encoder vs the checkpoint's fp32 tower
        patches = torch.randn(784, 1536, generator=torch.Generator().manual_seed(7))
        expected = ref.model.visual(patches, grid_thw=torch.tensor([[1, 28, 28]])).pooler_output
        ours, _ = engines["fp16"].vision.encoder(patches)
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1).min().item()
    assert cosine >= 0.9997, f"vision embeddings cosine {cosine:.6f}"
    json.dumps(bundle.metadata)  # plain JSON all through


def test_cli_run_image_prints_the_notice_once(vlm, tmp_path, capsys):
    _, _, engines, _ = vlm
    path = tmp_path / "photo.png"
    _image(8, 500, 300).save(path)
    cli_main(["run", str(engines["fp16"].bundle.path), "--image", str(path), "--image", str(path),
              "--prompt", "Describe the image.", "-g", "4", "--device", "cpu", "--prefill", "chunked"])
    captured = capsys.readouterr()
    assert captured.err.count("image resized from 500x300 to 448x448") == 1, captured.err
    assert captured.out.endswith("\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", str(engines["fp16"].bundle.path), "--image", str(tmp_path / "nope.png"), "--prompt", "Hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: image file not found"), err


def test_image_gate_passes(vlm):
    """`lmbundle gate`'s image part on one prompt: pixels vs the checkpoint's processor, the encoder from
    them, positions and the S=1 sweep."""
    from lmbundle.gates.image_gate import PROMPTS, run_image_gate
    from lmbundle.gates.oracle import Oracle

    _, _, engines, checkpoint = vlm
    report = run_image_gate(engines["fp16"], Oracle(str(checkpoint)), PROMPTS[1:2])
    assert report.passed, report.lines()
    assert report.positions_exact == 1 and report.sweep_positions == 16 and report.vision_min_cosine >= 0.9997
    assert report.pictures == 4 and report.pixels_worst <= 1e-5


def test_vision_aimodel_runs_on_core_ai(vlm, tmp_path):
    """The bundle's optional vision asset: exported by `write_vision`, compiled and run by the Core AI
    runtime, vs the checkpoint's fp32 vision tower (fp32 here: the Linux runtime's fp16 is ~100x slower)."""
    pytest.importorskip("coreai_torch")
    import asyncio

    import coreai.runtime as runtime

    from lmbundle.bundle.coreai import compile_asset
    from lmbundle.convert.checkpoint import open_checkpoint
    from lmbundle.convert.vision_export import write_vision

    family, ref, _, checkpoint = vlm
    if family != "qwen3_vl":
        pytest.skip("one family is enough: the export does not depend on it")
    section = write_vision(open_checkpoint(checkpoint), tmp_path, 64, dtype=torch.float32, asset="v.vision.aimodel")
    (tmp_path / "compiled").mkdir()
    compile_asset(tmp_path / section["asset"], tmp_path / "compiled")
    patches = torch.randn(784, 1536, generator=torch.Generator().manual_seed(9))

    async def encode():
        function = (await runtime.AIModel.load(tmp_path / "compiled")).load_function("main")
        outputs = await function({"patches": runtime.NDArray(patches.numpy())}, {})
        return {name: torch.from_numpy(np.array(array.numpy())) for name, array in outputs.items()}

    outputs = asyncio.run(encode())
    with torch.no_grad():
        expected = ref.model.visual(patches, grid_thw=torch.tensor([[1, 28, 28]]))
    assert (outputs["image_embeds"] - expected.pooler_output).abs().max() < 1e-4
    assert (outputs["deepstack_embeds"] - torch.cat(expected.deepstack_features)).abs().max() < 1e-4


def test_demo_vlm_image_gate(tmp_path):
    """The trained demo Qwen3-VL (its text is confident, unlike random weights): int8hu image gate."""
    from lmbundle.gates.image_gate import run_image_gate
    from lmbundle.gates.oracle import Oracle

    demo = Path(__file__).parents[1] / "lmbundle" / "data" / "demo" / "qwen3vl-tiny"
    if not demo.is_dir():
        pytest.skip("no demo Qwen3-VL checkpoint")
    bundle = convert(str(demo), tmp_path / "demo", quant="int8hu", backend="torch", max_context=1024, log=None)
    report = run_image_gate(Engine(bundle, backend="torch", device="cpu"), Oracle(str(demo)))
    assert report.passed, report.lines()
