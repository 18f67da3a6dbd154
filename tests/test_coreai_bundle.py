"""Bundles on the Core AI backend as Apple's engine would hold them, against the torch backend.

On the trained demo model (real margins): a 250-token prompt + 20 generated tokens crosses the 256-slot
KV length Apple's engine starts with, by the engine's pre-growth (prompt + max tokens) and by growth
during decode; prompts through the `prefill` function give the torch backend's tokens too. `--check`
passes a fresh bundle on the zoo's and Apple main's engines; `convert` refuses to finish a bundle that
fails the zoo's rules (the old state order). Old layouts against the hosts: test_coreai_hosts.py.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("coreai.runtime")
pytest.importorskip("coreai_torch")

from lmbundle.bundle.check import PASS, check_bundle  # noqa: E402
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
def bundle(tmp_path_factory):
    """A fresh int8hu bundle of the trained demo model."""
    root = tmp_path_factory.mktemp("coreai-bundle")
    return convert(str(DEMO_QWEN35), root / "new", quant="int8hu", backend="all", max_context=512, log=None)


@pytest.fixture(scope="module")
def engines(bundle):
    made = {"torch": Engine(bundle, backend="torch", device="cpu"), "coreai": Engine(bundle, backend="coreai")}
    yield made
    made["coreai"].backend.close()


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
    prompt as S=1 steps or as Apple's engine sends it (249 tokens in 4 balanced prefill chunks, the last
    through `main`)."""
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


def test_check_passes_a_new_bundle(bundle):
    report = check_bundle(bundle, hosts=["zoo", "apple-main"])
    assert report.passed, "\n".join(report.lines())
    status = {(rule.host, rule.name): rule.status for rule in report.rules}
    assert status["zoo", "state order"] == status["apple-main", "state kinds"] == PASS
    assert status["apple-main", "prefill function"] == status["apple-main", "prefill_chunk_size"] == PASS
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["language"]["states"] == {"keyCache": "kv_cache", "valueCache": "kv_cache",
                                              "convState": "fixed", "recState": "fixed"}
    assert metadata["language"]["function_map"] == {"main": ["main"], "prefill": ["prefill"]}
    assert metadata["kind"] == "llm" and metadata["source"]["hf_model_id"] == DEMO_QWEN35.name


def test_convert_refuses_a_bundle_that_fails_the_check(monkeypatch, tmp_path):
    export = coreai_export.export_aimodel
    monkeypatch.setattr(coreai_export, "export_aimodel", lambda *args, **kwargs: export(
        *args, **{**kwargs, "state_order": ("conv", "rec", "key", "value")}))
    with pytest.raises(LmbundleError, match="would not run on the zoo host.*state order"):
        convert(str(DEMO_QWEN35), tmp_path / "b", quant="int8hu", backend="all", max_context=512, log=None)
    assert not (tmp_path / "b").exists()


def test_a_coreai_only_bundle_carries_no_pytorch_weights(tmp_path):
    """`convert --backend coreai` wrote weights.safetensors too; now the .aimodel alone, and the PyTorch
    backend says what the bundle is instead of failing on a missing file."""
    bundle = convert(str(DEMO_QWEN35), tmp_path / "b", quant="int8hu", backend="coreai", max_context=256, log=None)
    assert not (bundle / "weights.safetensors").exists() and any(bundle.glob("*.aimodel"))
    with pytest.raises(LmbundleError, match="no PyTorch weights .* --backend coreai"):
        Engine(bundle, backend="torch", device="cpu")
    reply = Engine(bundle, backend="coreai").complete(Request("Once upon a time", max_tokens=4))
    assert len(reply.tokens) == 4
