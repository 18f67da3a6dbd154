"""Bundles on the Core AI backend as Apple's engine would hold them, against the torch backend.

On the trained demo model (real margins): a 250-token prompt + 20 generated tokens crosses the 256-slot
KV length Apple's engine starts with, by the engine's pre-growth (prompt + max tokens) and by growth
during decode; prompts through the `prefill` function give the torch backend's tokens too. `--check`
passes a fresh bundle and fails, naming the rule, a bundle from the old exporter (fixed KV), which still
runs on our backend with the torch backend's tokens; `convert` refuses to finish a bundle that fails it.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("coreai.runtime")
pytest.importorskip("coreai_torch")

from lmbundle.bundle.check import PASS, check_bundle  # noqa: E402
from lmbundle.bundle.format import open_bundle, write_metadata  # noqa: E402
from lmbundle.bundle.load import load_graph  # noqa: E402
from lmbundle.cli import main as cli_main  # noqa: E402
from lmbundle.convert import coreai_export  # noqa: E402
from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.engine.request import Request  # noqa: E402
from lmbundle.errors import LmbundleError  # noqa: E402
from tests.conftest import DEMO_QWEN35  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, NEW = 250, 20
TEXT = "Once upon a time there was a little cat who lived in a house by the sea. " * 40


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A fresh int8hu bundle and the same bundle as the old exporter made it (fixed KV of max_context
    slots, no prefill, no state kinds in metadata)."""
    root = tmp_path_factory.mktemp("coreai-bundle")
    new = convert(str(DEMO_QWEN35), root / "new", quant="int8hu", backend="all", max_context=512, log=None)
    old = shutil.copytree(new, root / "old")
    bundle = open_bundle(old)
    asset = bundle.aimodel_path
    shutil.rmtree(asset)
    coreai_export.export_aimodel(load_graph(bundle), 512, asset, kv="fixed", prefill_chunk=0)
    metadata = bundle.metadata
    del metadata["language"]["states"]
    metadata["language"]["function_map"] = {"main": ["main"]}
    write_metadata(old, metadata)
    return new, old


@pytest.fixture(scope="module")
def engines(bundles):
    new, old = bundles
    made = {"torch": Engine(new, backend="torch", device="cpu"), "coreai": Engine(new, backend="coreai"),
            "old": Engine(old, backend="coreai")}
    yield made
    made["coreai"].backend.close()
    made["old"].backend.close()


@pytest.fixture(scope="module")
def prompt(engines):
    ids = engines["torch"].encode(TEXT)[:PROMPT]
    assert len(ids) == PROMPT
    return ids


@pytest.fixture(scope="module")
def expected(engines, prompt):
    return engines["torch"].complete(Request(prompt, max_tokens=NEW, ignore_eos=True)).tokens


@pytest.mark.parametrize("chunk", [0, 64])
def test_generate_across_256_equals_torch(engines, prompt, expected, chunk):
    """Engine.generate as Apple's engine grows: 256 slots, pre-grown to 512 for 250 + 20 tokens; the
    prompt as S=1 steps or 3 prefill chunks of 64 + 58 steps."""
    backend = engines["coreai"].backend
    assert backend.dynamic_kv and backend.prefill_chunk == 64
    request = Request(prompt, max_tokens=NEW, ignore_eos=True, prefill_chunk=chunk)
    assert engines["coreai"].complete(request).tokens == expected
    assert backend.capacity == 512


def test_growth_during_decode_equals_torch(engines, prompt, expected):
    """States sized for the prompt only (256 slots), then grown by copying when step 256 comes."""
    backend = engines["coreai"].backend
    backend.reset(PROMPT)
    assert backend.capacity == 256
    handle = backend.prefill(prompt, 64)
    tokens = [handle]
    for position in range(PROMPT, PROMPT + NEW - 1):
        tokens.append(backend.step(tokens[-1], position))
    assert [backend.read_token(t) for t in tokens] == expected
    assert backend.capacity == 512


def test_old_fixed_kv_bundle_runs_on_our_backend(engines, prompt, expected):
    old = engines["old"].backend
    assert not old.dynamic_kv and old.prefill_chunk == 0 and old.max_context == 512
    request = Request(prompt, max_tokens=NEW, ignore_eos=True, prefill_chunk=64)
    assert engines["old"].complete(request).tokens == expected


def test_check_passes_a_new_bundle(bundles):
    report = check_bundle(bundles[0])
    assert report.passed, "\n".join(report.lines())
    status = {rule.name: rule.status for rule in report.rules}
    assert status["two growing KV states"] == status["keyCache sequence dim"] == PASS
    assert status["outputs[0] is fp16 logits"] == status["language.states agree with the engine"] == PASS
    metadata = json.loads((bundles[0] / "metadata.json").read_text())
    assert metadata["language"]["states"] == {"convState": "fixed", "recState": "fixed",
                                              "keyCache": "kv_cache", "valueCache": "kv_cache"}
    assert metadata["language"]["function_map"] == {"main": ["main"], "prefill": ["prefill"]}
    assert metadata["kind"] == "llm"


def test_check_fails_an_old_bundle_naming_the_rule(bundles):
    report = check_bundle(bundles[1])
    failed = {rule.name: rule for rule in report.failures}
    assert not report.passed
    assert set(failed) == {"two growing KV states"}
    assert "keyCache=sliding_cache" in failed["two growing KV states"].detail
    assert failed["two growing KV states"].source.endswith("StateHandlerFactory.swift")


def test_info_check_cli(bundles, capsys, tmp_path):
    cli_main(["info", "--check", str(bundles[0])])
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "DIFFERS extra outputs" in out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["info", "--check", str(bundles[1])])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL    two growing KV states" in out and out.rstrip().splitlines()[-1].startswith("  verdict: FAIL")
    broken = shutil.copytree(bundles[0], tmp_path / "broken")
    (broken / "metadata.json").write_text(json.dumps(dict(json.loads((broken / "metadata.json").read_text()),
                                                         metadata_version="0.1")))
    with pytest.raises(SystemExit):
        cli_main(["info", "--check", str(broken)])
    assert "FAIL    metadata_version: is '0.1'" in capsys.readouterr().out
    shutil.rmtree(broken / open_bundle(bundles[0]).aimodel_path.name)
    (broken / "metadata.json").write_text(json.dumps(dict(json.loads((broken / "metadata.json").read_text()),
                                                         metadata_version="0.2")))
    with pytest.raises(SystemExit):
        cli_main(["info", "--check", str(broken)])
    assert "FAIL    assets.main exists" in capsys.readouterr().out


def test_convert_refuses_a_bundle_that_fails_the_check(monkeypatch, tmp_path):
    export = coreai_export.export_aimodel
    monkeypatch.setattr(coreai_export, "export_aimodel",
                        lambda *args, **kwargs: export(*args, **{**kwargs, "kv": "fixed", "prefill_chunk": 0}))
    with pytest.raises(LmbundleError, match="would not load in Apple's engine.*two growing KV states"):
        convert(str(DEMO_QWEN35), tmp_path / "b", quant="int8hu", backend="all", max_context=512, log=None)
    assert not (tmp_path / "b").exists()
