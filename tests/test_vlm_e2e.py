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
from lmbundle.engine.request import Request
from lmbundle.errors import LmbundleError
from tests.checkpoints import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    VLM_VOCAB,
    image_message,
    image_processor,
    make_vlm,
    random_image,
)

SMALL_CONTEXT = 512  # the int8hu bundles: two images fit, three do not


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5"])
def vlm(request, tmp_path_factory):
    """(family, reference model, {quant: Engine}, checkpoint folder) for one tiny checkpoint converted twice."""
    root = tmp_path_factory.mktemp(request.param)
    ref = make_vlm(request.param, root / "ckpt")
    engines = {}
    for quant, context in (("fp16", 4096), ("int8hu", SMALL_CONTEXT)):
        bundle = convert(str(root / "ckpt"), root / quant, quant=quant, backend="torch", max_context=context,
                         max_images=4, log=None)  # multi-image prompts: lmbundle's engines only
        engines[quant] = Engine(bundle, backend="torch", device="cpu")
    return request.param, ref, engines, root / "ckpt"


def _hf_inputs(ids, images):
    """The reference's inputs: placeholders restored, the processor's pixel values of the stretched images."""
    raw = torch.tensor([IMAGE_PAD if t >= VLM_VOCAB else t for t in ids])
    inputs = dict(input_ids=raw[None], mm_token_type_ids=(raw == IMAGE_PAD).int()[None])
    if images:
        stretched = [im.resize((448, 448), Image.Resampling.BICUBIC) if im.size != (448, 448) else im for im in images]
        processed = image_processor()(images=stretched, return_tensors="pt")
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
    images = [random_image(1, 500, 300), random_image(2, 448, 448)][:count]  # one stretched, one at the fixed size
    ids = engine.chat_ids(image_message(images))
    assert len(ids) > count * 196 and sum(t >= VLM_VOCAB for t in ids) == count * 196
    with torch.no_grad():
        expected = ref(**_hf_inputs(ids, images)).logits[0]
    _compare(_teacher_forced(engine, ids), expected, min_cosine)


def test_greedy_identical_fp16(vlm):
    _, ref, engines, _ = vlm
    engine = engines["fp16"]
    images = [random_image(3, 640, 480)]
    ids = engine.chat_ids(image_message(images, "What is in it?"))
    with torch.no_grad():
        expected = ref.generate(**_hf_inputs(ids, images), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ours = engine.complete(Request(ids, max_tokens=12, ignore_eos=True)).tokens
    assert ours == expected[0, len(ids):].tolist()


def test_text_only_unchanged_by_the_image_context(vlm):
    """After an image prompt, a text prompt runs on the zeroed context: bit-identical to no context."""
    _, ref, engines, _ = vlm
    engine = engines["fp16"]
    model = engine.backend.model
    _teacher_forced(engine, engine.chat_ids(image_message([random_image(4, 448, 448)])))
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
    image = random_image(5, 320, 240)
    first = engines["int8hu"].chat_ids(image_message([image, image]))
    again = engines["int8hu"].chat_ids(image_message([image.copy()], "And now?"))
    assert len(vision.encode_seconds) == before + 1
    assert first[first.index(VLM_VOCAB) : first.index(VLM_VOCAB) + 3] == [VLM_VOCAB, VLM_VOCAB + 1, VLM_VOCAB + 2]
    assert VLM_VOCAB + 196 in first and VLM_VOCAB in again


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
        "at most 4": lambda: engine.chat_ids(image_message([random_image(k, 64, 64) for k in range(5)])),
        "context too long": lambda: engine.chat_ids(image_message([random_image(k, 64, 64) for k in range(3)])),
        "not the images": lambda: engine.complete(Request([1, 2, VLM_VOCAB, VLM_VOCAB + 1, 6], max_tokens=1)),
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
            engine.chat_ids(image_message([random_image(6, 64, 64)]))
    finally:
        engine.tokenizer.chat_template = template


def test_bundle_vision_section(vlm):
    family, ref, engines, _ = vlm
    bundle = engines["fp16"].bundle
    vision = bundle.metadata["vision"]
    deepstack = 2 if family == "qwen3_vl" else 0
    tokens = (vision["image_token_id"], vision["vision_start_token_id"], vision["vision_end_token_id"])
    assert tokens == (IMAGE_PAD, VISION_START, VISION_END) and vision["tokens_per_image"] == 196 and vision["grid_thw"] == [1, 28, 28]
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
    random_image(8, 500, 300).save(path)
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
    runtime, vs the checkpoint's fp32 vision tower (fp32 weights here: the Linux runtime's fp16 is ~100x
    slower). Its inputs and outputs are fp16 (the host's buffers): equal within fp16 rounding."""
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
    patches = torch.randn(784, 1536, generator=torch.Generator().manual_seed(9)).half()

    async def encode():
        function = (await runtime.AIModel.load(tmp_path / "compiled")).load_function("main")
        outputs = await function({"patches": runtime.NDArray(patches.numpy())}, {})
        return {name: torch.from_numpy(np.array(array.numpy())) for name, array in outputs.items()}

    outputs = asyncio.run(encode())
    with torch.no_grad():
        expected = ref.model.visual(patches.float(), grid_thw=torch.tensor([[1, 28, 28]]))
    assert outputs["image_embeds"].dtype == outputs["deepstack_embeds"].dtype == torch.float16
    torch.testing.assert_close(outputs["image_embeds"].float(), expected.pooler_output, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(outputs["deepstack_embeds"].float(), torch.cat(expected.deepstack_features),
                               rtol=1e-3, atol=1e-3)


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


def test_every_bundle_file_has_one_mode(vlm):
    """vision.safetensors was written 0600 (safetensors' own writer) while the rest is 0644."""
    _, _, engines, _ = vlm
    root = engines["fp16"].bundle.path
    modes = {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}
    assert "vision.safetensors" in modes and len(set(modes.values())) == 1, modes
