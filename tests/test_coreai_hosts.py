"""Fresh bundles against the hosts that run them (tests/hosts.py's emulators on the Linux Core AI runtime)
and against each host's rules (`info --check`), on tiny checkpoints of each kind (tests/conftest.py's
`host_bundles`: two Qwen3.5 text layouts, a Qwen3-VL, a Qwen3.5 with a vision tower).

Checked: the asset's contract (KV states first, a `prefill` function with `main`'s inputs and states and
no outputs, `prefill_chunk_size` in metadata, image inputs fp16 for one image, no build-machine path in
metadata.json); greedy tokens of the zoo's engine and of Apple's main engine equal the torch backend's,
for text and image prompts; the old state order fails the zoo engine with its own message and is refused
by `--check` and by the Core AI backend; a bundle from before this layout is refused naming the rule;
`coreai doctor` finds no known failure pattern.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("coreai.runtime")
pytest.importorskip("coreai_torch")

from lmbundle.bundle.check import FAIL, PASS, WARN, check_bundle, read_signatures  # noqa: E402
from lmbundle.bundle.format import (  # noqa: E402
    BUNDLE_VERSION,
    IMAGE_INPUT_NAMES,
    MAIN_FUNCTION,
    PREFILL_CHUNK,
    PREFILL_FUNCTION,
    open_bundle,
    write_metadata,
)
from lmbundle.bundle.load import load_graph  # noqa: E402
from lmbundle.cli import main as cli_main  # noqa: E402
from lmbundle.convert.coreai_export import export_aimodel  # noqa: E402
from lmbundle.engine.coreai_backend import CoreAIBackend, prefill_chunks  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.engine.request import Request  # noqa: E402
from lmbundle.errors import LmbundleError  # noqa: E402
from tests import checkpoints  # noqa: E402
from tests.conftest import HOST_SHAPES  # noqa: E402
from tests.hosts import AppleMainEngine, HostError, ZooEngine, prefill_chunk_sizes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT, VLM = HOST_SHAPES[:2], HOST_SHAPES[2:]
NEW = 8
PROMPT = "Once upon a time there was a little cat who lived in a house by the sea. The quick brown fox"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("host-cache")


@pytest.fixture(scope="module")
def torch_engines(host_bundles):
    return {shape: Engine(path, backend="torch", device="cpu") for shape, path in host_bundles.items()}


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("shape", HOST_SHAPES)
def test_contract(host_bundles, shape, tmp_path_factory):
    bundle = host_bundles[shape]
    metadata = json.loads((bundle / "metadata.json").read_text())
    functions = read_signatures(bundle / metadata["assets"]["main"])
    assert list(functions) == [MAIN_FUNCTION, PREFILL_FUNCTION]
    main, prefill = functions[MAIN_FUNCTION], functions[PREFILL_FUNCTION]
    states = main.names("states")
    assert states[:2] == ["keyCache", "valueCache"]
    assert states[2:] == ([] if shape == "qwen3_vl" else ["convState", "recState"])
    assert prefill.names("states") == states and prefill.names("inputs") == main.names("inputs")
    assert prefill.outputs == [] and dict(prefill.inputs)["input_ids"].shape == [1, -1]
    language = metadata["language"]
    assert language["prefill_chunk_size"] == PREFILL_CHUNK and language["prefill_chunk_threshold"] == 1
    assert language["function_map"] == {MAIN_FUNCTION: [MAIN_FUNCTION], PREFILL_FUNCTION: [PREFILL_FUNCTION]}
    root = str(tmp_path_factory.getbasetemp())
    leaks = [s for s in _strings(metadata) if s.startswith("/") or root in s]
    assert not leaks, leaks
    assert metadata["source"]["hf_model_id"] == language["tokenizer"] == f"{shape}-ckpt"
    assert metadata["kind"] == "llm"
    if shape in VLM:
        vision = metadata["vision"]
        tokens, hidden = vision["tokens_per_image"], vision["out_hidden_size"]
        inputs = dict(main.inputs)
        assert [(n, inputs[n].dtype, inputs[n].shape) for n in IMAGE_INPUT_NAMES] == [
            ("image_embeds", "Float16", [tokens, hidden]),
            ("deepstack_embeds", "Float16", [vision["num_deepstack"] * tokens, hidden]),
            ("rope_shift_start", "Int32", [1]), ("rope_shift_amount", "Int32", [1])]
        encoder = read_signatures(bundle / metadata["assets"]["vision"])["main"]
        assert {t.dtype for _, t in encoder.inputs + encoder.outputs} == {"Float16"}
    report = check_bundle(bundle)
    status = {(r.host, r.name): r.status for r in report.rules}
    assert not report.failures("zoo"), "\n".join(report.lines())
    assert status["apple-86b363d", "logits query length"] == FAIL  # #212: static logits break 86b363d
    assert status["apple-main", "logits query length"] == PASS  # #227
    if shape in TEXT:
        assert not report.failures("apple-main"), "\n".join(report.lines())
    else:  # Apple's engines take 2 inputs; its VLM engine cannot carry DeepStack or M-RoPE
        assert status["apple-main", "two inputs"] == status["apple-main", "Apple's VLM engine layout"] == FAIL


def test_prefill_chunk_plan():
    """Apple's balanced chunks: all but the last token, none wider than the chunk, within one of each other."""
    for count, width in ((1, 64), (2, 64), (65, 64), (66, 64), (200, 64), (29, 8)):
        sizes = prefill_chunks(count, width)
        assert sizes == prefill_chunk_sizes(count, width)
        assert sum(sizes) == count - 1 and all(0 < s <= width for s in sizes)
        assert not sizes or max(sizes) - min(sizes) <= 1
    assert prefill_chunks(66, 64) == [33, 32]


@pytest.mark.parametrize("shape", TEXT)
def test_text_hosts_give_torch_tokens(host_bundles, torch_engines, cache, shape):
    """A 20-token prompt: the zoo's engine (S=1), Apple's main (prefill chunks of 64: one chunk of 19),
    and Apple's main with an 8-token chunk (three balanced chunks) all give the torch backend's tokens."""
    engine = torch_engines[shape]
    prompt = engine.encode(PROMPT)[:20]
    expected = engine.complete(Request(prompt, max_tokens=NEW, ignore_eos=True)).tokens
    zoo = ZooEngine(host_bundles[shape], cache)
    apple = AppleMainEngine(host_bundles[shape], cache)
    try:
        assert zoo.generate(prompt, NEW) == expected
        assert apple.generate(prompt, NEW) == expected
        apple.chunk = 8
        assert apple.generate(prompt, NEW) == expected
    finally:
        zoo.close()
        apple.close()


@pytest.mark.parametrize("shape", VLM)
def test_image_prompt_on_the_zoo_host_gives_torch_tokens(host_bundles, torch_engines, cache, shape):
    """One image: the zoo host runs the fp16 encoder asset on the image's patches, sets the 4 fp16 static
    inputs once, feeds the prompt as S=1 steps; the tokens are the torch backend's. A text prompt after it
    (the "no image" inputs) too. Apple's main engine refuses the decoder (2 inputs)."""
    engine = torch_engines[shape]
    image = checkpoints.random_image(3, 640, 480)
    ids = engine.chat_ids(checkpoints.image_message([image]))
    expected = engine.complete(Request(ids, max_tokens=NEW, ignore_eos=True)).tokens
    vocab, image_token = engine.vision.vocab_size, engine.vision.info.image_token_id
    template = [image_token if t == vocab else t for t in ids if t < vocab or t == vocab]
    patches = engine.vision.prepare(image).patches.numpy()
    zoo = ZooEngine(host_bundles[shape], cache)
    try:
        host_ids = zoo.image_prompt(template, patches)
        assert host_ids == ids
        assert zoo.generate(host_ids, NEW) == expected
        text = engine.chat_ids([{"role": "user", "content": "Describe the sea."}])
        zoo.set_image(None)
        zoo.reset()
        assert zoo.generate(text, NEW) == engine.complete(Request(text, max_tokens=NEW, ignore_eos=True)).tokens
    finally:
        zoo.close()
    with pytest.raises(HostError, match="Expected 2 inputs, got 6"):
        AppleMainEngine(host_bundles[shape], cache)


@pytest.fixture(scope="module")
def old_layout(host_bundles, tmp_path_factory):
    """The "base" bundle as lmbundle wrote it before the hosts' contract: GDN states first, bundle version 2."""
    old = shutil.copytree(host_bundles["base"], tmp_path_factory.mktemp("old") / "old")
    bundle = open_bundle(old)
    asset = bundle.aimodel_path
    shutil.rmtree(asset)
    export_aimodel(load_graph(bundle), bundle.max_context, asset, state_order=("conv", "rec", "key", "value"))
    metadata = bundle.metadata
    metadata["lmbundle"]["bundle_version"] = BUNDLE_VERSION - 1
    write_metadata(old, metadata)
    return old


def test_old_layout_is_refused(old_layout, cache, capsys):
    with pytest.raises(HostError, match="Extra state 'keyCache' has dynamic dims"):
        ZooEngine(old_layout, cache)
    report = check_bundle(old_layout)
    failed = {(r.host, r.name) for r in report.failures()}
    assert {("zoo", "state order"), ("zoo", "extra states static")} <= failed
    assert {(h, "lmbundle bundle_version") for h in report.hosts} <= failed
    asset = next(old_layout.glob("*.aimodel"))
    with pytest.raises(LmbundleError, match=r"an older lmbundle wrote this asset.*convert the checkpoint again"):
        CoreAIBackend(asset, cache)
    with pytest.raises(LmbundleError, match="bundle version 2 .*convert the checkpoint again"):
        Engine(old_layout, backend="coreai")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["info", "--check", "--host", "zoo", str(old_layout)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "zoo: Extra state 'keyCache' has dynamic dims" in out and "verdict zoo: FAIL (lmbundle bundle_version" in out


def test_info_check_cli(host_bundles, capsys, tmp_path):
    bundle = host_bundles["base"]
    cli_main(["info", "--check", "--host", "zoo", "--host", "apple-main", str(bundle)])
    out = capsys.readouterr().out
    assert "verdict zoo: PASS" in out and "verdict apple-main: PASS" in out and "apple-86b363d" not in out
    with pytest.raises(SystemExit) as exit_info:  # every host: 86b363d's logits buffer rejects static logits
        cli_main(["info", "--check", str(bundle)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "verdict apple-86b363d: FAIL (logits query length)" in out
    assert "TensorStorage+CoreAI.swift:58-59" in out and "#227" in out
    # --target ios: a 4096-slot context and the per-channel head are flagged, not failed
    flagged = shutil.copytree(bundle, tmp_path / "flagged")
    metadata = json.loads((flagged / "metadata.json").read_text())
    metadata["language"]["max_context_length"] = 4096
    metadata["lmbundle"]["quant"]["head"] = "int8-perchan"
    (flagged / "metadata.json").write_text(json.dumps(metadata))
    report = check_bundle(flagged, hosts=["zoo"], target="ios")
    status = {r.name: r.status for r in report.rules}
    assert status["iOS KV capacity"] == status["head quant"] == WARN and status["iOS memory"] == PASS
    assert report.passed


@pytest.mark.parametrize("shape", HOST_SHAPES)
def test_coreai_doctor_finds_no_known_failure(host_bundles, shape):
    pytest.importorskip("coreai_doctor")
    result = subprocess.run([sys.executable, "-m", "coreai_doctor", str(host_bundles[shape])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no known failure pattern detected" in result.stdout
