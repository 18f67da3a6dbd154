"""The sabotage suite on the PyTorch backend: every breakage that once passed the gates, made the way a
converter bug would make it (hashes rewritten), on a tiny random checkpoint and the trained demo models,
must FAIL with a message naming it (or be refused at load); clean bundles of every quant mode, and of
fresh-init checkpoints on every backend, must PASS. Bundles are made once per session (`sabotage_models`,
`fresh_bundles`) and shared; the gate runs one short prompt with 8-token rollouts plus its random-token
coverage of the whole vocabulary, or only its static checks where the breakage is static. The Core AI
cases (the `.aimodel` itself) are in test_sabotage_coreai.py.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch

from lmbundle.engine.engine import Engine
from lmbundle.errors import LmbundleError
from lmbundle.gates.gate import BOUNDS, PROMPTS, random_prompts, run_gate, verdict
from lmbundle.gates.image_gate import PROMPTS as IMAGE_PROMPTS
from lmbundle.gates.image_gate import run_image_gate
from lmbundle.gates.paths import excusable
from lmbundle.gates.quality import check_quality
from lmbundle.gates.weights import check_vision_weights
from tests import sabotage
from tests.conftest import DEMO_QWEN35, FRESH
from tests.sabotage import QUANT_MODES, SHORT_PROMPT, figures

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_COREAI = importlib.util.find_spec("coreai") is not None and importlib.util.find_spec("coreai_torch") is not None
DEMO_VLM = DEMO_QWEN35.parent / "qwen3vl-tiny"


@pytest.fixture(scope="module")
def models(sabotage_models):
    return sabotage_models


@pytest.mark.parametrize("model", ["tiny", "demo"])
@pytest.mark.parametrize("mode", list(QUANT_MODES))
def test_clean_bundles_pass(models, model, mode):
    report = models[model].gate(models[model].bundle(mode))
    print(f"\nclean {model} {mode}: {figures(report)}")
    assert report.passed, report.lines() + report.failures
    assert report.exact_worst < BOUNDS["fp32"] / 10 and report.state_worst < BOUNDS["fp32"] / 10
    assert report.vocab_covered == 1.0 and report.rollout_excused == 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("coreai", marks=pytest.mark.skipif(
    not HAS_COREAI, reason="coreai-core / coreai-torch not installed"))])
@pytest.mark.parametrize("name", list(FRESH))
def test_fresh_init_bundles_pass(fresh_bundles, name, backend):
    """Checkpoints straight from transformers' init (norms all zero or one, dt_bias all ones, zero biases:
    uniform tensors, kept as splats in the .aimodel), tied and untied, text and VLM, on every backend."""
    _, bundle, oracle = fresh_bundles[name]
    engine = Engine(bundle, backend=backend, device="cpu" if backend == "torch" else None)
    try:
        report = run_gate(engine, oracle, prompts=(SHORT_PROMPT,), rollouts=4, coverage=None if backend == "torch" else 257)
        image = run_image_gate(engine, oracle, IMAGE_PROMPTS[:1]) if engine.is_vlm else None
    finally:
        if hasattr(engine.backend, "close"):
            engine.backend.close()
    print(f"\nfresh {name} {backend}: {figures(report)}" + (f"; image {image.lines()}" if image else ""))
    assert verdict(report, image) == "PASS", report.lines() + (image.lines() if image else [])
    assert report.weights_checked and (report.aimodel_reads if backend == "coreai" else True)


# (bundle mode, edit(model) -> weights edit)
WEIGHT_CASES = {
    "embed rare rows swapped": ("int8hu", lambda m: sabotage.swap_rows("model.embed_tokens", *m.rare_ids())),
    "int8 head rare rows swapped": ("int8hu", lambda m: sabotage.swap_rows("lm_head", *m.rare_ids())),
    "tied head common rows swapped": ("fp16", lambda m: sabotage.swap_rows("model.embed_tokens", *m.common_ids())),
    "conv1d zeroed (layer 0)": ("fp16", lambda m: sabotage.set_value("model.layers.0.linear_attn.conv1d.weight", 0.0)),
    "dt_bias 0 (layer 2)": ("int8hu", lambda m: sabotage.set_value("model.layers.2.linear_attn.dt_bias", 0.0)),
    "A_log sign (layer 1)": ("int8hu", lambda m: sabotage.negate("model.layers.1.linear_attn.A_log")),
    "head clipped at q95, block-32 scales": ("int8hu", lambda m: sabotage.clip_head()),
    "MLP scales x1.02": ("int8hu", lambda m: sabotage.scale(".mlp.", 1.02, (".scales",))),
    "o_proj x1.05": ("fp16", lambda m: sabotage.scale("self_attn.o_proj", 1.05)),
    "o_proj x0": ("int8lin", lambda m: sabotage.scale("self_attn.o_proj", 0.0, (".scales",))),
    "two layers' MLPs swapped": ("int8hu", lambda m: sabotage.swap_modules("model.layers.0.mlp.down_proj",
                                                                          "model.layers.1.mlp.down_proj")),
}


@pytest.mark.parametrize("model", ["tiny", "demo"])
@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weight_sabotage_fails(models, model, case):
    """Hashes rewritten: only the gate can tell. Both the row-by-row weight check and the logits on
    every vocabulary entry must see it (the logits are what catch damage no weight check reads)."""
    m = models[model]
    mode, make = WEIGHT_CASES[case]
    path = sabotage.edit_weights(m.bundle(mode), m.fresh(case), make(m))
    report = m.gate(path)
    print(f"\n{case} ({model}, {mode}): {figures(report)}")
    assert not report.passed and report.weights_bad, report.lines()
    assert report.exact_worst > report.bound, figures(report)


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_rope_bug_on_q_only_fails(models, model, monkeypatch):
    m = models[model]
    heads = m.oracle.model.config.get_text_config().num_attention_heads
    sabotage.rope_on_q_only(monkeypatch, heads)
    report = m.gate(m.bundle("fp16"))
    print(f"\nrope q-only ({model}): {figures(report)}")
    assert not report.passed and report.exact_worst > report.bound


def test_rope_frequencies_off_5_percent_fail(models, monkeypatch):
    """The graph's RoPE inverse frequencies x1.05 (the demo: one attention layer, a quarter of its dims
    rotated, theta 1e7): its logits and its KV cache part from the oracle's."""
    m = models["demo"]
    sabotage.rope_frequencies_scaled(monkeypatch, 1.05)
    report = m.gate(m.bundle("int8hu"), prompts=PROMPTS[:1])
    print(f"\nrope x1.05 (demo): {figures(report)}")
    assert not report.passed and report.paths["S=1"] > report.bound and report.states["key"] > report.bound


def test_chunked_path_bug_fails_where_s1_passes(models, monkeypatch):
    """Multi-token chunks with the causal conv's taps reversed (a prefill-only bug): the S=1 path stays
    exact, the chunked forward, the prompt path and the states after it fail."""
    m = models["demo"]
    sabotage.prompt_conv_reversed(monkeypatch)
    report = m.gate(m.bundle("int8hu"), prompts=PROMPTS[:1])
    print(f"\nconv reversed in chunks (demo): {figures(report)}")
    assert report.paths["S=1"] < report.bound / 10
    assert report.paths["chunked"] > report.bound and report.paths["prompt path"] > report.bound
    assert report.states["rec"] > report.bound
    assert any(f.startswith("states after the prompt path differ") for f in report.failures), report.failures


def test_fork_rule_is_arithmetic():
    """A fork is excused only where the oracle's two logits are closer than twice the bound (std units)."""
    assert excusable(0.39, 1.0, 0.2) and not excusable(0.41, 1.0, 0.2)
    assert excusable(0.79, 2.0, 0.2) and not excusable(1e-3, 1.0, 0.0)


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_swapped_token_ids_fail(models, model):
    """tokenizer.json with two ids swapped: refused at load while its hash is stale; with the hashes
    rewritten, the gate fails (it encodes with the oracle's tokenizer and compares the bundle's)."""
    m = models[model]
    path = sabotage.swap_token_ids(m.bundle("fp16"), m.fresh("tokenizer"))
    with pytest.raises(LmbundleError, match="tokenizer.json: sha256 does not match"):
        Engine(path, backend="torch", device="cpu")
    sabotage.rehash(path)
    report = m.static(path)
    assert not report.passed and not report.tokenizer_ok, report.lines()
    assert any("vocabulary entries differ" in f for f in report.failures), report.failures


def test_tokenizer_decoder_dropped_fails(models):
    """tokenizer.json without its byte-level decoder (text would come out as 'Ġ' soup): encoding is
    unchanged, decoding the fixed multilingual text differs."""
    m = models["demo"]
    path = sabotage.edit_tokenizer_file(m.bundle("fp16"), m.fresh("decoder"), "tokenizer.json",
                                        lambda data: data.update(decoder=None))
    report = m.static(path)
    print(f"\ndecoder dropped: {report.failures}")
    assert not report.tokenizer_ok and any("decodes differently" in f for f in report.failures), report.failures


def test_generation_config_eos_changed_fails(models):
    m = models["demo"]
    path = sabotage.edit_tokenizer_file(m.bundle("fp16"), m.fresh("eos"), "generation_config.json",
                                        lambda data: data.update(eos_token_id=3065))
    report = m.static(path)
    print(f"\neos changed: {report.failures}")
    assert not report.generation_ok
    assert any("generation config differs" in f and "eos_token_id [3065] (checkpoint [3067])" in f
               for f in report.failures), report.failures


def test_recipe_is_the_declared_modes(models):
    """A body quantized per channel (its recipe rewritten to match, so the bundle is exact to *its*
    recipe) while the mode and metadata declare int8hu's per-block-32: the expected recipe comes from the
    declared mode, not from the bundle."""
    m = models["tiny"]
    path = sabotage.requantize_body_per_channel(m.bundle("int8hu"), m.fresh("perchannel"))
    report = m.static(path)
    print(f"\nper-channel body: {report.failures}")
    assert not report.recipe_ok and report.weights_bad
    assert any(f.startswith("recipe differs from the declared int8hu/block32: model.layers.0.") and "int8 per 64 "
               "(declared int8 per 32)" in f for f in report.failures), report.failures


METADATA_CASES = {
    "layer_types cut": lambda meta: meta["lmbundle"]["config"].update(
        layer_types=meta["lmbundle"]["config"]["layer_types"][:-1]),
    "rope_theta changed": lambda meta: meta["lmbundle"]["config"].update(rope_theta=1234.0),
    "num_hidden_layers changed": lambda meta: meta["lmbundle"]["config"].update(num_hidden_layers=3),
}


@pytest.mark.parametrize("model", ["tiny", "demo"])
@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_metadata_sabotage_fails(models, model, case):
    """A hand edit is refused at load (content_sha256); one that rewrites the hashes too is refused by
    the config check at load (layer count) or fails the gate (its config differs from the oracle's)."""
    m = models[model]
    path = sabotage.edit_metadata(m.bundle("fp16"), m.fresh("meta"), METADATA_CASES[case])
    with pytest.raises(LmbundleError, match="content_sha256"):
        Engine(path, backend="torch", device="cpu")
    sabotage.rehash(path)
    try:
        report = m.gate(path)
    except LmbundleError as exc:
        print(f"\n{case} ({model}, rehashed): load error: {exc}")
        assert "layer" in str(exc)
        return
    print(f"\n{case} ({model}, rehashed): {report.failures}")
    assert not report.passed and not report.config_ok


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_extra_weight_tensor_is_refused(models, model):
    m = models[model]
    path = sabotage.edit_weights(m.bundle("fp16"), m.fresh("extra"), sabotage.add_tensor())
    with pytest.raises(LmbundleError, match="extra.weight is not part of the graph"):
        m.gate(path)


def test_missing_tokenizer_is_one_line(models, tmp_path):
    m = models["tiny"]
    no_json = sabotage.copy_bundle(m.bundle("fp16"), tmp_path / "no-json")
    (no_json / "tokenizer" / "tokenizer.json").unlink()
    no_folder = sabotage.copy_bundle(m.bundle("fp16"), tmp_path / "no-folder")
    shutil.rmtree(no_folder / "tokenizer")
    for path, expected in ((no_json, "tokenizer.json: missing"), (no_folder, "tokenizer: missing")):
        out = subprocess.run([sys.executable, "-m", "lmbundle", "run", str(path), "--prompt", "Hi", "-g", "2",
                              "--backend", "torch", "--device", "cpu"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr


def test_quality_gate_fails_a_clipping_recipe(models):
    """Part B on its own: had the recipe clipped the int8 head at the 95th percentile of each block (a
    bundle made that way is exact to *its* simulated oracle), the quantization figures fail the int8
    thresholds on the demo model (docs/gates.md has the figures)."""
    from lmbundle.gates.gate import GateReport, gate_sequences
    from lmbundle.gates.weights import expected_recipe

    m = models["demo"]
    recipe, _ = expected_recipe(Engine(m.bundle("int8hu"), backend="torch", device="cpu").bundle, m.oracle)
    simulated = m.oracle.simulated(recipe)
    head = m.oracle.model.lm_head.weight.data
    blocks = head.reshape(head.shape[0], -1, 32)
    scales = (torch.quantile(blocks.abs(), 0.95, dim=-1, keepdim=True) / 127).half().float().clamp_min(1e-8)
    simulated.model.lm_head.weight.data = (torch.clamp(torch.round(blocks / scales), -127, 127) * scales).reshape(head.shape)
    sequences = gate_sequences(m.oracle, PROMPTS) + random_prompts(head.shape[0], head.shape[0], set())
    pairs = [(simulated.forward(ids).logits, m.oracle.forward(ids).logits) for ids in sequences]
    report = GateReport("clipped", "torch", "int8hu")
    failures = check_quality(report, pairs)
    print(f"\nclipping recipe (demo): top1 {report.quality_top1:.4f} kl {report.quality_kl:.2e} top5 {report.quality_top5:.4f}")
    assert len(failures) == 3, failures


# -- the VLM: the vision encoder's weights and the image path from pixels ------------------------------------
@pytest.fixture(scope="module")
def demo_vlm(tmp_path_factory):
    from lmbundle.convert.convert import convert
    from lmbundle.gates.oracle import Oracle

    root = tmp_path_factory.mktemp("vlm")
    bundle = convert(str(DEMO_VLM), root / "vl", quant="int8hu", backend="torch", max_context=1024, log=None)
    return root, bundle, Oracle(str(DEMO_VLM))


VLM_CASES = {  # breakage -> (bundle made from the clean one, or None: a code bug patched in)
    "patch embedding x1.02": lambda src, dst: sabotage.edit_file_tensors(
        src, dst, "vision.safetensors", sabotage.scale("patch_embed.proj", 1.02, (".weight",))),
    "DeepStack merger norm x1.05": lambda src, dst: sabotage.edit_file_tensors(
        src, dst, "vision.safetensors", sabotage.scale("deepstack_merger_list.1.norm", 1.05, (".weight",))),
    "image mean altered": lambda src, dst: sabotage.edit_vision(src, dst, image_mean=[0.48, 0.46, 0.41]),
    "image std altered": lambda src, dst: sabotage.edit_vision(src, dst, image_std=[0.27, 0.26, 0.28]),
    "resampling filter bilinear": lambda src, dst: sabotage.edit_vision(src, dst, resample=2),
    "fixed image size 96": lambda src, dst: sabotage.fixed_image_size(src, dst, 96),
    "channel order BGR": None,
}


@pytest.mark.parametrize("case", list(VLM_CASES))
def test_vlm_sabotage_fails(demo_vlm, case, monkeypatch):
    """On the demo Qwen3-VL (hashes rewritten): vision weights fail row by row and through the embeddings;
    the image path fails against the checkpoint's processor from pixels."""
    root, clean, oracle = demo_vlm
    make = VLM_CASES[case]
    if make is None:
        sabotage.bgr_pixels(monkeypatch)
        path = clean
    else:
        path = make(clean, root / case.replace(" ", "-"))
    engine = Engine(path, backend="torch", device="cpu")
    _, bad = check_vision_weights(engine.bundle, oracle)
    report = run_image_gate(engine, oracle, IMAGE_PROMPTS[:1])
    print(f"\n{case}: weights {bad[:2]}; {report.failures}")
    assert not report.passed
    if "x1.0" in case:
        assert bad and report.vision_worst > 0.1 and any("vision embeddings" in f for f in report.failures)
    else:
        assert any("the bundle's patches differ" in f for f in report.failures), report.failures
    if make is not None and "x1.0" not in case:
        assert any("preprocessing differs from the checkpoint's processor" in f for f in report.failures)


def test_vlm_deepstack_level_zeroed_fails_with_one_verdict(demo_vlm):
    """A whole DeepStack level zeroed in the encoder (hashes rewritten): `lmbundle gate` prints its
    progress on stderr, and one verdict line, at the end, naming the weights and the image part."""
    root, clean, _ = demo_vlm
    broken = sabotage.edit_file_tensors(clean, root / "vl-broken", "vision.safetensors",
                                        sabotage.scale("deepstack_merger_list.1.linear_fc2", 0.0, (".weight", ".bias")))
    out = subprocess.run([sys.executable, "-m", "lmbundle", "gate", str(broken), "--oracle", str(DEMO_VLM), "--backend",
                          "torch", "--device", "cpu", "--coverage", "256"], capture_output=True, text=True, timeout=600)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 1, out.stdout + out.stderr
    assert lines[-1].startswith("FAIL: weights differ from the recipe applied to the checkpoint: vision "), lines
    assert "image: vision embeddings from pixels" in lines[-1]
    assert sum(line.startswith(("PASS", "FAIL")) for line in lines) == 1
    assert "gate [" in out.stderr and "image prompt 1/2" in out.stderr
