"""The sabotage suite on the Core AI backend: damage put in the `.aimodel` only (re-exported from
damaged weights or under a patched graph; the safetensors the PyTorch backend reads stay clean) must
FAIL the gate naming it: weights checked in place in each function's bytecode (statically: no runtime
step), and the functions themselves run on the Linux runtime where the damage is in their arithmetic.
"""

from __future__ import annotations

import importlib.util

import pytest

from lmbundle.engine.engine import Engine
from lmbundle.errors import LmbundleError
from lmbundle.gates.gate import PROMPTS
from tests import sabotage
from tests.sabotage import figures

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(
    importlib.util.find_spec("coreai") is None or importlib.util.find_spec("coreai_torch") is None,
    reason="coreai-core / coreai-torch not installed")]


@pytest.fixture(scope="module")
def models(sabotage_models):
    return sabotage_models


def test_coreai_clean_passes(models):
    m = models["tiny"]
    report = m.gate(m.bundle("int8hu", coreai=True), backend="coreai", rollouts=4, coverage=257)
    print(f"\ncoreai clean tiny int8hu: {figures(report)}")
    assert report.passed, report.lines() + report.failures
    assert report.aimodel_reads["main"] > 90 and not report.aimodel_bad and "prompt path" in report.paths


def test_coreai_weights_are_checked_in_place(models, monkeypatch):
    """One re-export carrying independent damages, each named by the static check of both functions:
    two layers' MLP weights swapped (present, misplaced), a rare embedding row pair swapped, dt_bias 0 in
    one layer, the MLP scales of one layer x1.02 (one the prompt function reads too: it drops the last
    layer's MLP, whose result reaches no state), and RoPE inverse frequencies x1.05 (a derived constant)."""
    m = models["tiny"]
    clean = m.bundle("int8hu", coreai=True)
    sabotage.rope_frequencies_scaled(monkeypatch, 1.05)
    edit = sabotage.edits(
        sabotage.swap_modules("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"),
        sabotage.swap_rows("model.embed_tokens", *m.rare_ids()),
        sabotage.set_value("model.layers.2.linear_attn.dt_bias", 0.0),
        sabotage.scale("model.layers.2.mlp.up_proj", 1.02, (".scales",)),
    )
    path = sabotage.reexported(clean, m.fresh("in-place"), edit)
    report = m.static(path, backend="coreai")
    print(f"\ncoreai in place: {report.aimodel_bad}")
    assert not report.passed and not report.weights_bad  # the safetensors are clean
    assert len(report.aimodel_reads) == 2  # `main` and the prompt function
    for function in report.aimodel_reads:
        for expected in ("model.layers.0.mlp.down_proj.weight (qweight) misplaced",
                         "model.layers.1.mlp.down_proj.weight (scales) misplaced",
                         "model.embed_tokens.weight differs", "model.layers.2.linear_attn.dt_bias differs",
                         "model.layers.2.mlp.up_proj.weight (scales) differs", "inv_freq differs"):
            assert f"{function}: {expected}" in report.aimodel_bad, (expected, report.aimodel_bad)
    assert len(report.aimodel_bad) == 2 * 8  # nothing else: both parts of each swapped linear, no layout noise
    assert report.failures[0].startswith(".aimodel weights differ from the recipe applied to the checkpoint: ")


def test_coreai_uniform_tensor_damage_fails(fresh_bundles, tmp_path):
    """A fresh-init bundle, whose dt_bias is all ones (a one-element splat in the bytecode, shared by the
    layers): dt_bias set to zero in one layer's `.aimodel` is named (its ones are found, at the other
    layers' places only), where a byte search finds the ones (and zeros) anywhere."""
    checkpoint, bundle, oracle = fresh_bundles["text-untied"]
    path = sabotage.reexported(bundle, tmp_path / "fresh-dt", sabotage.set_value("model.layers.1.linear_attn.dt_bias", 0.0))
    from lmbundle.gates.gate import run_gate

    engine = Engine(path, backend="coreai")
    try:
        report = run_gate(engine, oracle, prompts=(), chat=None, coverage=0)
    finally:
        engine.backend.close()
    assert report.aimodel_bad == [f"{function}: model.layers.1.linear_attn.dt_bias misplaced"
                                  for function in report.aimodel_reads], report.aimodel_bad


def test_coreai_prompt_function_conv_fails(models, monkeypatch):
    """The prompt function exported with its causal conv's taps reversed (`main` right): its constants
    sit out of order, and the states it writes part from the oracle's cache."""
    m = models["tiny"]
    clean = m.bundle("int8hu", coreai=True)
    with monkeypatch.context() as patch:
        sabotage.prompt_conv_reversed(patch)
        path = sabotage.reexported(clean, m.fresh("prompt-conv"))
    report = m.gate(path, backend="coreai", prompts=(), coverage=257)
    print(f"\ncoreai prompt conv reversed: {figures(report)}")
    assert report.aimodel_bad and all(not item.startswith("main: ") and "conv1d" in item for item in report.aimodel_bad)
    assert report.states["rec"] > report.bound
    assert any(f.startswith("states after the prompt path differ") for f in report.failures), report.failures


def test_coreai_prompt_function_short_solve_fails(demo_bundles, models, monkeypatch, tmp_path):
    """The prompt function's WY triangular solve cut to two factors of the series (the trained demo: its
    slow decays make the dropped terms count; no constant changes): the states it writes fail."""
    m = models["demo"]
    with monkeypatch.context() as patch:
        sabotage.short_triangular_solve(patch, factors=2)
        path = sabotage.reexported(demo_bundles["int8hu"], tmp_path / "short-solve")
    report = m.gate(path, backend="coreai", prompts=PROMPTS[:1], rollouts=1, coverage=0)
    print(f"\ncoreai short solve (demo): {figures(report)}")
    assert not report.aimodel_bad and report.paths["S=1"] < report.bound and report.states["rec"] > report.bound
    assert any(f.startswith("states after the prompt path differ") for f in report.failures), report.failures


def test_coreai_cache_hit_checks_the_bytecode(models, tmp_path, monkeypatch):
    """A byte of main.mlirb flipped after the program was compiled and cached (main.hash stale, the
    bundle's records rewritten): the hit must not run the old program."""
    import os

    from lmbundle.bundle.coreai import VERIFIED

    monkeypatch.setenv("LMBUNDLE_CACHE", str(tmp_path / "cache"))
    m = models["tiny"]
    path = sabotage.copy_bundle(m.bundle("fp16", coreai=True), tmp_path / "flip")
    Engine(path, backend="coreai").backend.close()  # compiles and caches
    Engine(path, backend="coreai").backend.close()  # a hit (digest memo: no second read)
    bytecode = next(path.glob("*.aimodel")) / "main.mlirb"
    stat = bytecode.stat()
    data = bytearray(bytecode.read_bytes())
    data[len(data) // 2] ^= 0x01
    bytecode.write_bytes(bytes(data))
    os.utime(bytecode, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the mtime put back
    sabotage.rehash(path)
    assert len(list((tmp_path / "cache" / "coreai").glob(f"*/{VERIFIED}"))) == 1
    with pytest.raises(LmbundleError, match="main.mlirb does not match main.hash"):
        Engine(path, backend="coreai")
