"""Image prompts on the Core AI backend: a tiny random VLM checkpoint converted with backend="all"
(int8hu) runs the same prompts on the torch backend (the reference) and on the `.aimodel` step with its
four image inputs, on the Linux Core AI runtime.

Checked: the asset's image inputs and their shapes; on an image prompt (Qwen3-VL with DeepStack,
Qwen3.5 with zero DeepStack rows) greedy identity and per-step logits along the torch sequence; on a
text prompt after it (the "no images" inputs) the per-step logits. Logits agree within 1e-2 and on
top-1 wherever the reference is not a near tie (the text prompt has one at 2e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coreai.runtime")
pytest.importorskip("coreai_torch")

from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.engine.request import Request  # noqa: E402
from tests.checkpoints import image_message, make_vlm, random_image  # noqa: E402

CONTEXT, NEW_TOKENS = 256, 10  # one 196-token image + the template + the answer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5"])
def engines(request, tmp_path_factory):
    """(family, torch Engine, coreai Engine) on one int8hu bundle holding both backends."""
    root = tmp_path_factory.mktemp(f"coreai-{request.param}")
    make_vlm(request.param, root / "ckpt")
    bundle = convert(str(root / "ckpt"), root / "bundle", quant="int8hu", backend="all", max_context=CONTEXT, log=None)
    reference, coreai = Engine(bundle, backend="torch", device="cpu"), Engine(bundle, backend="coreai")
    yield request.param, reference, coreai
    coreai.backend.close()


def _step_logits(engine, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """[S, V] logits of S=1 steps over prompt + answer, with the engine's image context for the prompt."""
    engine.vision.activate(prompt)
    ids = prompt + answer
    backend = engine.backend
    backend.reset(len(ids))
    rows = [backend.logits(backend.step(torch.tensor([[token]]), position)) for position, token in enumerate(ids)]
    return torch.stack(rows).float()


def _assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Within the int8 decoder's fp16 noise, and the same top-1 wherever the reference is not a near tie."""
    assert (ours - expected).abs().max() < 1e-2
    top2 = expected.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) >= 0.01
    assert ((ours.argmax(-1) == expected.argmax(-1)) | ~decided).all()


def test_asset_takes_the_image_inputs(engines):
    family, reference, coreai = engines
    layout = coreai.backend._image_layout
    slots = reference.vision.info.max_images * reference.vision.info.tokens_per_image
    deepstack = reference.vision.info.num_deepstack
    assert deepstack == (2 if family == "qwen3_vl" else 0)
    assert reference.vision.info.max_images == 1  # the hosts' contract: one image, fp16 inputs
    assert layout["image_embeds"] == ((slots, 64), np.dtype(np.float16))
    assert layout["deepstack_embeds"] == ((deepstack * slots, 64), np.dtype(np.float16))
    int32 = ((reference.vision.info.max_images,), np.dtype(np.int32))
    assert layout["rope_shift_start"] == layout["rope_shift_amount"] == int32


def test_image_prompt_greedy_matches_torch(engines):
    _, reference, coreai = engines
    message = image_message([random_image(3, 640, 480)])
    ids = reference.chat_ids(message)
    assert coreai.chat_ids(message) == ids and len(ids) > 196
    request = Request(ids, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = reference.complete(request).tokens
    assert coreai.complete(request).tokens == expected
    # the prompt through the asset's `prefill` function (chunks of 64 with the image inputs) + S=1 steps
    assert coreai.backend.prefill_chunk == 64
    assert coreai.complete(Request(ids, max_tokens=NEW_TOKENS, ignore_eos=True, prefill_chunk=64)).tokens == expected
    # and the logits behind those tokens (Qwen3.5's tiny answer repeats one token)
    _assert_close(_step_logits(coreai, ids, expected), _step_logits(reference, ids, expected))


def test_text_prompt_after_an_image_prompt_matches_torch(engines):
    _, reference, coreai = engines
    coreai.chat_ids(image_message([random_image(4, 448, 448)]))  # a pending image context the text prompt must not see
    ids = coreai.chat_ids([{"role": "user", "content": "Describe the image."}])
    answer = reference.complete(Request(ids, max_tokens=NEW_TOKENS, ignore_eos=True)).tokens
    _assert_close(_step_logits(coreai, ids, answer), _step_logits(reference, ids, answer))


def test_image_gate_on_core_ai(tmp_path):
    """`lmbundle gate VLM --backend coreai`'s image part on the trained demo Qwen3-VL: in-graph M-RoPE
    positions == get_rope_index, the S=1 sweep on the Core AI asset (dynamic KV states) top-1 == the
    fp32 transformers oracle; and the bundle's Apple keys. (Growth past 256: test_coreai_bundle.py.)"""
    import json
    from pathlib import Path

    from lmbundle.bundle.check import check_bundle
    from lmbundle.gates.image_gate import run_image_gate
    from lmbundle.gates.oracle import Oracle

    demo = Path(__file__).parents[1] / "lmbundle" / "data" / "demo" / "qwen3vl-tiny"
    bundle = convert(str(demo), tmp_path / "demo", quant="int8hu", backend="all", max_context=1024, max_images=2,
                     log=None)  # the gate's two-image prompt too
    report = check_bundle(bundle, hosts=["zoo"])
    status = {rule.name: rule.status for rule in report.rules}
    assert status["state order"] == status["VisionConfig keys"] == status["vision encoder asset"] == "PASS"
    assert {r.name for r in report.failures()} == {"input image_embeds", "input deepstack_embeds",
                                                   "input rope_shift_start", "input rope_shift_amount"}  # 2 slots
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["kind"] == "llm" and metadata["assets"]["vision"] == metadata["vision"]["asset"]
    assert metadata["language"]["states"] == {"keyCache": "kv_cache", "valueCache": "kv_cache"}
    engine = Engine(bundle, backend="coreai")
    try:
        assert engine.is_vlm and not hasattr(engine.backend, "model")
        gate = run_image_gate(engine, Oracle(str(demo)))
        assert gate.passed, gate.lines()
        assert gate.positions_exact == gate.prompts == 3 and gate.sweep_positions == 48
        assert engine.backend.capacity >= 256  # the engine's first allocation (the demo's images are 16 tokens)
    finally:
        engine.backend.close()
